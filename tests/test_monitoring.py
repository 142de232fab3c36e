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
