"""Chaos on a real local Ray: rollout workers and teacher replicas killed at random moments, many times,
in one run. Every rollout batch the learner needed is trained exactly once (or dropped as stale, and
counted), never twice, never lost; the accounting adds up."""

import contextlib
import json
import os
import random
import signal
import threading
import time

import pytest
import ray

from ar2dlm_ray.config import load_config

from test_ray import pid_once_up, ray_overrides


def run_beside(trainer, fault, done: threading.Event) -> dict:
    """Train while `fault` (which stops once `done` is set) runs on a thread; the run's summary."""
    thread = threading.Thread(target=fault, daemon=True)
    thread.start()
    try:
        return trainer.run()
    finally:
        done.set()
        thread.join()
        trainer.close()


@contextlib.contextmanager
def _stalled(pid: int):
    """The process stops answering (SIGSTOP), as a hung actor does; it is killed afterwards if Ray has not."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _closing(trainer):
    try:
        yield
    finally:
        trainer.close()


@pytest.mark.slow
def test_random_kills_train_every_batch_exactly_once(micro_teacher, tmp_path, local_ray):
    from ar2dlm_ray.cluster.driver import RayTrainer

    steps = 10
    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": steps, "rollout.num_workers": 2, "teacher.num_replicas": 2,
        "rollout.max_restarts": 30, "teacher.pool.max_restarts": 30,
        "learner.max_staleness": 1, "learner.stale_policy": "drop"}))
    trainer = RayTrainer(cfg, lambda *a: None)
    rng = random.Random(7)
    kills: list[str] = []
    done = threading.Event()

    def killer():
        while not done.is_set() and len(kills) < 8:
            time.sleep(rng.uniform(0.3, 1.5))
            name = rng.choice(["rollout-0", "rollout-1", "teacher-0", "teacher-1"])
            try:
                ray.kill(ray.get_actor(name), no_restart=False)
                kills.append(name)
            except Exception:  # noqa: BLE001 - it may be restarting; try another moment
                pass

    summary = run_beside(trainer, killer, done)
    metrics = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc, delivery = summary["accounting"], summary["delivery"]
    trained = [b for m in metrics for b in m["batches"]]
    assert len(kills) >= 5, kills
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert len(trained) == len(set(trained)) == steps, "a batch was trained twice"
    assert sorted(trained) == delivery["trained_ids"]
    # Nothing lost: every batch id up to the last one trained was trained, dropped as stale, or still queued
    # when training ended (produced ahead).
    seen = delivery["trained_ids"] + delivery["dropped_ids"] + delivery["left_in_queue_ids"]
    assert set(range(max(trained) + 1)) <= set(seen), sorted(seen)
    assert delivery["consumed"] == delivery["trained"] + delivery["dropped"] + delivery["discarded_duplicates"]
    assert acc["trained_on"] == 8 * steps and acc["dropped_stale"] == 8 * delivery["dropped"]
    assert acc["discarded_duplicates"] == 8 * delivery["discarded_duplicates"]
    for name, restarts in summary["worker_deaths"].items():  # restarts seen, at most one per kill
        assert restarts <= kills.count(name), (name, restarts, kills)


@pytest.mark.slow
def test_a_worker_out_of_restarts_ends_the_run_with_one_line(micro_teacher, tmp_path, local_ray):
    from ar2dlm_ray.cluster.driver import RayTrainer
    from ar2dlm_ray.config import RunError

    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": 8, "rollout.num_workers": 2, "rollout.max_restarts": 1}))
    trainer = RayTrainer(cfg, lambda *a: None)
    record = trainer._record

    def record_then_kill(results, step_s):  # fault injection: rollout-0 dies after steps 1 and 3
        out = record(results, step_s)
        if out["step"] in (1, 3):
            ray.kill(trainer.workers[0], no_restart=False)
        return out

    trainer._record = record_then_kill
    try:
        with pytest.raises(RunError, match=r"^rollout-0 died and is out of restarts \(rollout.max_restarts=1\)") as err:
            trainer.run()
    finally:
        trainer.close()
    assert err.value.resumable and "\n" not in str(err.value)


def test_an_unreachable_ray_address_fails_fast_with_one_line():
    import subprocess
    import sys

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ar2dlm_ray.cli", "train", "--config", "configs/micro.yaml",
                           "mode=ray", "ray.address=127.0.0.1:1", "ray.connect_timeout_s=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - start < 60
    assert proc.stderr.strip().splitlines() == [
        "ar2dlm: error: cannot reach a Ray cluster at '127.0.0.1:1' within ray.connect_timeout_s=2s "
        "([Errno 111] Connection refused); start one (`ray start --head`) or fix ray.address / RAY_ADDRESS"]


@pytest.mark.slow
def test_stalled_actors_cost_one_call_deadline_are_restarted_and_their_work_redone(micro_teacher, tmp_path,
                                                                                   local_ray):
    """A rollout worker and both teacher replicas stop answering (SIGSTOP), as hung actors do: each costs one
    call deadline, not the run; each is restarted in a new process, and its batch or scoring call is redone.
    Both teachers stop: with one healthy replica left, a short run could end before the deadline and never meet
    the stalled one."""
    from ar2dlm_ray.cluster.driver import RayTrainer

    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": 5, "rollout.num_workers": 2, "rollout.call_timeout_s": 8,
        "teacher.num_replicas": 2, "teacher.call_timeout_s": 3}))
    logs: list[str] = []
    trainer = RayTrainer(cfg, logs.append)
    stopped = [info["pid"] for info in trainer.placement["teacher"]]
    with _stalled(trainer.placement["rollout"][1]["pid"]), _stalled(stopped[0]), _stalled(stopped[1]), \
            _closing(trainer):
        start = time.monotonic()
        summary = trainer.run()
        wall = time.monotonic() - start
        now = [pid_once_up(teacher) for teacher in trainer.teachers]
    assert not set(now) & set(stopped), "the stalled replicas were restarted"
    assert summary["accounting"]["retried"] >= 2 and summary["steps"] == 5
    assert wall < cfg.ray.timeout_s / 10, wall
    assert summary["delivery"]["trained_ids"] == list(range(5)), "the stalled worker's batch was redone"
    assert any("rollout-1 has not delivered batch" in line for line in logs), logs
