"""The three-stage pipeline and its elastic pools on a real local Ray: a teacher replica that dies holding
a rollout batch loses nothing, and pools resized mid-run (from the command line and through the
controller) keep exact accounting: every rollout batch is trained once, dropped as stale, or still queued
when training ends, and nothing is rolled out that is not accounted for."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray

from ar2dlm_ray.config import load_config

from test_ray import ray_overrides
from test_ray_chaos import run_beside


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


SAMPLE = re.compile(r'^(ray_ar2dlm_\w+)\{(.*)\} (\S+)$')


def _exported() -> list[tuple[str, dict, float]]:
    """The ar2dlm series that Ray exports for Prometheus now: (name, labels, value)."""
    import urllib.request

    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=10).read().decode()
    return [(m[1], dict(re.findall(r'(\w+)="([^"]*)"', m[2])), float(m[3]))
            for m in map(SAMPLE.match, text.splitlines()) if m]


def _scrape_until(done: threading.Event, scrapes: list) -> None:
    while not done.wait(1.0):
        scrapes.append((time.monotonic(), _exported()))


def _check_accounting(summary: dict, metrics: list[dict], batch_size: int) -> None:
    acc, delivery = summary["accounting"], summary["delivery"]
    trained = [b for m in metrics for b in m["batches"]]
    assert len(trained) == len(set(trained)) and sorted(trained) == delivery["trained_ids"], "a batch trained twice"
    seen = delivery["trained_ids"] + delivery["dropped_ids"] + delivery["left_in_queue_ids"]
    assert set(range(max(trained) + 1)) <= set(seen), f"a batch was lost: {sorted(seen)}"
    assert acc["trained_on"] == batch_size * delivery["trained"]
    assert acc["dropped_stale"] == batch_size * delivery["dropped"]
    assert acc["discarded_duplicates"] == batch_size * delivery["discarded_duplicates"]
    assert delivery["consumed"] == delivery["trained"] + delivery["dropped"] + delivery["discarded_duplicates"]


@pytest.mark.slow
def test_the_stages_overlap_and_a_batch_held_by_a_dying_teacher_is_scored_by_another(micro_teacher, tmp_path,
                                                                                  local_ray):
    from ar2dlm_ray.cluster.driver import SCORE_QUEUE_NAME, RayTrainer

    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": 8, "rollout.num_workers": 2, "teacher.num_replicas": 2, "learner.max_staleness": 3}))
    logs: list[str] = []
    trainer = RayTrainer(cfg, logs.append)
    victim: dict = {}
    done = threading.Event()

    pids = {f"teacher-{i}": info["pid"] for i, info in enumerate(trainer.placement["teacher"])}

    def kill_a_teacher_holding_a_batch():
        """Freeze a replica that holds a batch (so it cannot finish and ack it meanwhile), check that it still
        holds it, and kill its process; if it acked just before it froze, let it go on and try again."""
        queue = ray.get_actor(SCORE_QUEUE_NAME)
        while not done.is_set() and not victim:
            for holder, batches in ray.get(queue.holders.remote()).items():
                if batches and batches[0] >= 2:
                    os.kill(pids[holder], signal.SIGSTOP)
                    if batches[0] in ray.get(queue.holders.remote()).get(holder, []):
                        # Killed while frozen (ray.kill is asynchronous: a thawed process could still ack); Ray
                        # restarts it.
                        victim.update(name=holder, batch=batches[0])
                        os.kill(pids[holder], signal.SIGKILL)
                    else:
                        os.kill(pids[holder], signal.SIGCONT)
                    break
            time.sleep(0.01)

    summary = run_beside(trainer, kill_a_teacher_holding_a_batch, done)
    metrics = _metrics(tmp_path)
    assert victim, "no teacher was caught holding a batch"
    assert any(f"{victim['name']} failed holding rollout batch(es) [{victim['batch']}" in line for line in logs), logs
    delivery = summary["delivery"]
    assert victim["batch"] in delivery["trained_ids"] + delivery["dropped_ids"] + delivery["left_in_queue_ids"]
    _check_accounting(summary, metrics, 8)
    # Scoring happened on the teacher pool, not inside the rollout workers.
    assert summary["accounting"]["scored"] >= summary["accounting"]["trained_on"] > 0
    assert set(summary["teacher_load"]) == {"teacher-0", "teacher-1"}
    assert all(0.0 <= m["busy"]["teacher"] <= 1.0 and m["pools"] == {"teacher": 2, "rollout": 2, "learner": 1}
               for m in metrics)


def _drive_until(trainer, done, timeout_s: float = 180.0) -> None:
    """Hold the driver between two steps while it keeps serving its pools (applying resize requests,
    starting and draining actors), until `done()`: the test's operator then acts at a known step, however
    fast the micro steps are."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the pools did not reach the asked sizes"
        producers = trainer.producers
        producers.next_poll = 0.0
        producers.pump(trainer.step)
        for ref in ray.wait(list(producers.inflight), num_returns=1, timeout=0.2)[0] if producers.inflight else ():
            producers.on_done(ref)


def _settled(trainer, rollout: int, teacher: int) -> bool:
    pools = trainer.producers.pools
    return all(len(pools[k].members) == n and all(m.state == "active" for m in pools[k].members.values())
               for k, n in (("rollout", rollout), ("teacher", teacher)))


@pytest.mark.slow
def test_pools_resized_mid_run_from_the_command_line_keep_exact_accounting(micro_teacher, tmp_path,
                                                                          local_ray):
    from ar2dlm_ray.cluster.controller import CONTROLLER_NAME
    from ar2dlm_ray.cluster.driver import RayTrainer

    steps = 10
    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": steps}))
    logs: list[str] = []
    trainer = RayTrainer(cfg, logs.append)
    address = ray.get_runtime_context().gcs_address
    cli = [sys.executable, "-m", "ar2dlm_ray.cli", "pools"]
    where = ["--address", address, "--run", "ar2dlm-test"]
    answers: dict = {}

    def run(*args):
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_ADDRESS": ""})

    record = trainer._record

    def record_then_operate(results, step_s):
        """A user watching the job: after step 2 scales up from the command line, after step 6 back down
        through the controller actor."""
        out = record(results, step_s)
        if out["step"] == 2:
            answers["refused"] = run("scale", *where, "learner=2")
            answers["no_room"] = run("scale", *where, "rollout=50")
            answers["up"] = run("scale", *where, "rollout=3", "teacher=2")
            trainer.producers.next_poll = 0.0
            trainer.producers.pump(trainer.step)  # the resize applied: the new actors are starting
            answers["starting"] = trainer.producers.sizes(), trainer.producers.joined()
            _drive_until(trainer, lambda: _settled(trainer, 3, 2))
        if out["step"] == 6:
            answers["down"] = ray.get(ray.get_actor(CONTROLLER_NAME).scale.remote({"rollout": 1, "teacher": 1}))
            _drive_until(trainer, lambda: _settled(trainer, 1, 1))
            answers["show"] = run("show", *where)
        return out

    trainer._record = record_then_operate
    scrapes: list = []
    done = threading.Event()
    scraper = threading.Thread(target=_scrape_until, args=(done, scrapes))
    scraper.start()
    try:
        summary = trainer.run()
    finally:
        done.set()
        scraper.join()
        trainer.close()
    metrics = _metrics(tmp_path)
    assert answers["refused"].returncode == 2 and answers["refused"].stderr.strip().splitlines() == [
        "ar2dlm: error: pool 'learner' cannot be resized (its process group is fixed when the job starts; "
        "resubmit to change it)"]
    assert answers["no_room"].returncode == 2 and re.fullmatch(
        r"ar2dlm: error: the cluster cannot place rollout=50 now \(CPU: the new actors need 49, the cluster has free "
        r"\d+\); add nodes or ask for fewer", answers["no_room"].stderr.strip()), answers["no_room"].stderr
    assert answers["up"].returncode == 0 and "asked for rollout=3 teacher=2" in answers["up"].stdout
    assert "error" not in answers["down"]
    # The object alone: Ray may print its own warnings after it (a raylet's "N workers started").
    shown = json.JSONDecoder().raw_decode(answers["show"].stdout[answers["show"].stdout.index("{"):])[0]
    assert shown["members"] == {"rollout": ["rollout-0"], "teacher": ["teacher-0"]}
    events = [(e["pool"], e["from"], e["to"], e["why"]) for e in summary["pools"]["events"]]
    assert events == [("rollout", 1, 3, "requested"), ("teacher", 1, 2, "requested"),
                      ("rollout", 3, 1, "requested"), ("teacher", 2, 1, "requested")], events
    assert [(e["pool"], e["from"], e["to"]) for e in shown["events"]] == [e[:3] for e in events]
    assert summary["pools"]["sizes"] == {"rollout": 1, "teacher": 1, "learner": 1}
    sizes = [m["pools"]["rollout"] for m in metrics]
    assert sizes[:2] == [1, 1] and 3 in sizes and sizes[-1] == 1, sizes
    assert any("pools t2 r3 l1" in line for line in logs), "pool sizes in the step log"
    # learner.max_staleness: auto follows the producers (ceil(P / L) + publish_every + 1 for P = 2, 5, 2).
    bounds = [m["staleness_bound"] for m in metrics]
    assert bounds[0] == 4 and 7 in bounds and bounds[-1] == 4, bounds
    assert any("learner.max_staleness=auto (7 now)" in line for line in logs)
    assert any(re.search(r" drops \d+ \(\+\d+\) .*in flight \d+ ", line) for line in logs)
    for name in ("rollout-1", "rollout-2", "teacher-1"):
        assert any(f"{name} joined" in line for line in logs), name
        assert any(f"{name} drained and stopped" in line for line in logs), name
    _check_monitoring(metrics, scrapes, answers["starting"], cfg, tmp_path)
    work = summary["pools"]["batches_delivered"]
    assert work.get("rollout-1", 0) + work.get("rollout-2", 0) > 0 and work.get("teacher-1", 0) > 0, work
    assert summary["steps"] == steps
    _check_accounting(summary, metrics, 8)
    # Nothing rolled out is unaccounted for: no actor died, so every batch produced was trained, dropped,
    # discarded or left queued.
    acc, delivery = summary["accounting"], summary["delivery"]
    assert acc["rolled_out"] == 8 * (delivery["trained"] + delivery["dropped"] + delivery["discarded_duplicates"]
                                     + len(delivery["left_in_queue_ids"])), (acc, delivery)


def _check_monitoring(metrics: list[dict], scrapes: list, starting: tuple, cfg, out_dir) -> None:
    """What Ray exported while the run lived (scraped every second), against metrics.jsonl and the step line."""
    # The step line and metrics.jsonl show the actors that have joined, not the sizes asked for.
    asked, joined = starting
    assert asked["rollout"] == 3 and asked["teacher"] == 2 and joined["rollout"] == 1 and joined["teacher"] == 1
    assert all(0.0 <= f <= 1.0 for m in metrics for f in m["busy"].values()), [m["busy"] for m in metrics]
    # The `run` label is the name that config.json keeps for a --resume (an earlier test's series may linger).
    assert json.loads((out_dir / "config.json").read_text())["logging"]["run_name"] == cfg.logging.run_name
    scrapes = [[(name, labels, value) for name, labels, value in samples if labels["run"] == cfg.logging.run_name]
               for _, samples in scrapes]
    # Every pool gauge, from its first export to the run's end, in every scrape, labelled by pool (no actor).
    pools = [{labels["pool"]: (labels, value) for name, labels, value in samples if name == "ray_ar2dlm_pool_size"}
             for samples in scrapes]
    first = next(i for i, p in enumerate(pools) if len(p) == 3)
    assert all(set(p) == {"rollout", "teacher", "learner"} for p in pools[first:]), pools
    assert all("actor" not in labels for p in pools for labels, _ in p.values())
    assert {p["rollout"][1] for p in pools[first:]} <= {1.0, 2.0, 3.0}
    # queue_depth is the step line's `in flight` (metrics.jsonl's queue_depth).
    depths = {value for samples in scrapes for name, _, value in samples if name == "ray_ar2dlm_queue_depth"}
    assert depths and depths <= {float(m["queue_depth"]) for m in metrics}, depths
    # A drained actor's series end with it (its running totals included), while the others go on.
    drained = {"rollout-1", "rollout-2", "teacher-1"}
    seen = {labels.get("actor") for samples in scrapes for _, labels, _ in samples}
    assert drained <= seen and {"rollout-0", "teacher-0", "learner-0"} <= seen, seen
    deadline = time.monotonic() + 60
    while {labels.get("actor") for _, labels, _ in _exported() if labels["run"] == cfg.logging.run_name} & drained:
        assert time.monotonic() < deadline, "a drained actor's metrics are still exported"
        time.sleep(1)


@pytest.mark.slow
def test_a_recipe_without_teacher_targets_skips_the_scoring_stage(micro_teacher, tmp_path, local_ray):
    """sft: the teacher generates x0 (direct calls), nothing is scored, batches go straight to the learners;
    with one actor per pool and max_staleness 0 the run still equals the local trainer's."""
    from ar2dlm_ray.cluster.driver import RayTrainer
    from ar2dlm_ray.trainer import LocalTrainer

    common = {"train.recipe": "sft", "train.max_steps": 3}
    LocalTrainer(load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path / "local", **common)),
                 log=lambda *a: None).run()
    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path / "ray", mode="ray", **{
        **common, "learner.max_staleness": 0}))
    trainer = RayTrainer(cfg, lambda *a: None)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    want, got = _metrics(tmp_path / "local"), _metrics(tmp_path / "ray")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(want, got)) < 1e-5 and len(got) == 3
    assert summary["accounting"]["scored"] == 0 and summary["teacher_load"] == {}
    assert all(m["score_backlog"] == 0 for m in got)
    _check_accounting(summary, got, 8)
