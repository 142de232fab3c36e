"""Monitoring without a cluster: the step line, and TensorBoard event files that match metrics.jsonl."""

import json
import re
import struct

from ar2dlm_ray.config import load_config
from ar2dlm_ray.progress import Progress
from ar2dlm_ray.trainer import LocalTrainer

STEP_LINE = re.compile(r"^\[train\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (\d+)/(\d+) loss [\d.]+ tokens/s (\d+) "
                       r"eta (\d\d:\d\d:\d\d) drops (\d+)")


def test_step_line_has_time_throughput_eta_and_drops():
    progress = Progress(start_step=10, total_steps=110, start_tokens=5000)
    progress.started = 100.0
    line = progress.line(20, 1.23456, 9000, drops=7, extra="queue 2", now=140.0)
    match = STEP_LINE.match(line)
    assert match, line
    # 10 steps and 4000 tokens in 40 s (the resumed run's earlier steps do not count): 100 tokens/s, and
    # the 90 steps left take 360 s.
    assert match.groups() == ("20", "110", "100", "00:06:00", "7")
    assert "loss 1.2346" in line and line.endswith("drops 7 queue 2")


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def test_local_run_writes_tensorboard_events_equal_to_metrics(micro_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = []
    cfg = load_config("configs/micro.yaml", [
        f"model.teacher={micro_teacher}", f"train.out_dir={tmp_path}", "train.max_steps=3",
        "train.rollout_batch_size=8", "train.micro_batch_size=8", "data.num_prompts=64", "sampler.max_new_tokens=8",
        "curriculum.min_len=4", "curriculum.max_len=8", "sampler.batch_size=8", "logging.progress=true"])
    LocalTrainer(cfg, log=lines.append).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    # Event files hold float32.
    assert [e.value for e in loss] == [_f32(r["loss"]) for r in records]
    assert [e.value for e in events.Scalars("train/lr")] == [_f32(r["lr"]) for r in records]
    updates = [u["loss"] for r in records for u in r["updates"]]
    assert len(updates) >= 3
    assert [e.value for e in events.Scalars("updates/loss")] == [_f32(u) for u in updates]
    assert {"throughput/tokens_per_s", "train/kl"} <= set(events.Tags()["scalars"])
    steps = [m.groups() for m in map(STEP_LINE.match, lines) if m]
    assert [(s[0], s[1], s[4]) for s in steps] == [("1", "3", "0"), ("2", "3", "0"), ("3", "3", "0")], lines


def test_tokens_per_s_is_over_the_last_window_of_step_lines():
    """Against the naive rate: tokens between the line WINDOW lines back (the start before that) and now."""
    import random

    from ar2dlm_ray.progress import WINDOW

    rng = random.Random(0)
    progress = Progress(start_step=0, total_steps=100, start_tokens=300)
    progress.started = 50.0
    points = [(50.0, 300)]
    for step in range(1, 40):
        # The throughput changes (a resize): a cumulative average would lag behind it.
        points.append((points[-1][0] + rng.uniform(0.5, 3.0), points[-1][1] + (100 if step < 20 else 400)))
        now, tokens = points[-1]
        then, before = points[max(0, step - WINDOW)]
        match = STEP_LINE.match(progress.line(step, 1.0, tokens, drops=0, now=now))
        assert int(match.group(3)) == round((tokens - before) / (now - then)), step


def test_busy_seconds_never_count_time_twice_and_stay_within_the_window():
    """Against a naive count on a fine grid: the union of the busy spans within [start, end], less what was
    counted before; so a pool's busy fraction stays within [0, 1]."""
    import random

    from ar2dlm_ray.cluster.pools import busy_seconds

    rng = random.Random(1)
    for _ in range(200):
        ends = sorted(rng.uniform(0, 10) for _ in range(rng.randint(0, 5)))
        spans = [(e - rng.uniform(0, 4), e) for e in ends]  # reported busy times may overlap
        counted, start, end = rng.uniform(0, 4), rng.uniform(0, 5), rng.uniform(5, 10)
        seconds, now_counted = busy_seconds(spans, counted, start, end)
        grid = [i / 200 for i in range(2000)]
        naive = sum(0.005 for t in grid if start <= t < end and t >= counted and any(a <= t < b for a, b in spans))
        assert abs(seconds - naive) < 0.1 and 0.0 <= seconds <= end - start
        assert now_counted == max([counted, start] + [min(b, end) for a, b in spans])


def test_a_resumed_run_keeps_its_run_name(tmp_path):
    """The `run` label of the metrics: from the run directory's config.json on --resume, unless named."""
    from ar2dlm_ray.tracking import run_name, saved_run_name

    first = load_config("configs/micro.yaml", [f"train.out_dir={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps({"logging": {"run_name": run_name(first)}}))
    assert saved_run_name(load_config("configs/micro.yaml", [f"train.out_dir={tmp_path}"])) == first.logging.run_name
    named = load_config("configs/micro.yaml", [f"train.out_dir={tmp_path}", "logging.run_name=other"])
    assert saved_run_name(named) is None
    assert saved_run_name(load_config("configs/micro.yaml", [f"train.out_dir={tmp_path / 'none'}"])) is None
