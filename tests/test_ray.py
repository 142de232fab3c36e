"""The Ray system on a real local Ray: it agrees with the local trainer step for step, and it survives
dying actors (retries counted), stale rollouts (regenerated) and a data-parallel learner group."""

import json
import math
import time

import pytest
import ray

from ar2dlm_ray.config import load_config
from ar2dlm_ray.trainer import LocalTrainer

def ray_overrides(teacher, out_dir, **extra):
    base = {
        "model.teacher": teacher, "train.out_dir": str(out_dir), "logging.progress": "true",
        "train.rollout_batch_size": 8, "train.minibatch_size": 4, "train.micro_batch_size": 8, "data.num_prompts": 64,
        "sampler.max_new_tokens": 12, "curriculum.min_len": 4, "curriculum.max_len": 12,
        "curriculum.warmup_steps": 3, "sampler.batch_size": 8, "train.max_steps": 4, "train.checkpoint_every": 100,
        "rollout.num_cpus": 1, "teacher.pool.num_cpus": 1, "learner.num_cpus": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def pid_once_up(actor, timeout_s: float = 120) -> int:
    """The actor's pid, once its restart (if any) is done: the run may end before it is."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.info.remote())["pid"]
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_reference(micro_teacher, tmp_path_factory):
    """The local trainer's metrics for the settings the Ray runs must reproduce."""
    from conftest import one_torch_thread

    out = tmp_path_factory.mktemp("local")
    with one_torch_thread():  # as the actors run
        LocalTrainer(load_config("configs/micro.yaml", ray_overrides(micro_teacher, out)), log=lambda *a: None).run()
    return _metrics(out), json.loads((out / "summary.json").read_text())["accounting"]


def _ray_cfg(teacher, out_dir, **extra):
    return load_config("configs/micro.yaml", ray_overrides(teacher, out_dir, mode="ray", **{
        "learner.max_staleness": 0, **extra}))


def test_ray_run_matches_local_trainer(micro_teacher, tmp_path, local_ray, local_reference):
    from ar2dlm_ray.cluster.driver import train

    ref, local_acc = local_reference
    summary = train(_ray_cfg(micro_teacher, tmp_path, **{"train.checkpoint_every": 2}), log=lambda *a: None)
    got = _metrics(tmp_path)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    # Two optimiser steps (minibatches of 4) per rollout batch, each one's loss recorded.
    deltas = [abs(u["loss"] - v["loss"])
              for a, b in zip(ref, got) for u, v in zip(a["updates"], b["updates"], strict=True)]
    assert len(deltas) == 8 and max(deltas) < 1e-5, deltas
    assert [m["version"] for m in got] == [0, 1, 2, 3] and all(m["version_lag"] == 0 for m in got)
    assert [m["tokens_trained"] for m in ref] == [m["tokens_trained"] for m in got]
    for key, value in local_acc.items():
        assert summary["accounting"][key] == value, key
    assert (tmp_path / "final" / "ar2dlm_student.json").is_file()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004"]


@pytest.mark.slow
def test_collective_transport_matches_local(micro_teacher, tmp_path, local_ray, local_reference):
    """The gloo broadcast transport (flat buckets) moves the same weights: the local trainer's losses again.
    (A Ray run resumed from its checkpoint is checked beside the faults that stop one, below.)"""
    from ar2dlm_ray.cluster.driver import train

    ref, _ = local_reference
    train(_ray_cfg(micro_teacher, tmp_path, **{"learner.transport": "collective", "rollout.num_workers": 2}),
          log=lambda *a: None)
    collective = _metrics(tmp_path)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, collective)) < 1e-5
    assert [m["version"] for m in collective] == [0, 1, 2, 3]


@pytest.mark.slow
def test_failures_staleness_and_data_parallel_learners(micro_teacher, tmp_path, local_ray):
    from ar2dlm_ray.cluster.driver import RayTrainer

    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": 6, "rollout.num_workers": 2, "teacher.num_replicas": 2, "learner.num_workers": 2,
        "learner.max_staleness": 1, "learner.stale_policy": "regenerate", "train.checkpoint_every": 3}))
    killed = {}
    trainer = RayTrainer(cfg, lambda *a: None)
    call = trainer.producers._call

    def call_then_kill(member, ref, kind, batch=None, attempt=0):
        # Fault injection: the worker dies with this batch in flight, and a teacher replica dies too.
        call(member, ref, kind, batch, attempt)
        if kind == "produce" and batch == 5 and not killed:
            killed["worker"] = member.name
            ray.kill(member.handle, no_restart=False)
            ray.kill(ray.get_actor("teacher-1"), no_restart=False)

    trainer.producers._call = call_then_kill
    try:
        before = {a["pid"] for a in trainer.placement["teacher"] + trainer.placement["rollout"]}
        # A rollout from a long-gone weight version arrives first: it must be regenerated, not trained on.
        trainer.on_learners("publish", 0)
        stale = ray.get(trainer.workers[0].produce.remote(50, 0, to_queue=False))
        stale.stats.version = -5
        trainer.queue.put(stale)
        summary = trainer.run()
        after = {pid_once_up(a) for a in trainer.teachers + trainer.workers}
        states = ray.get([lw.state.remote() for lw in trainer.learners])
    finally:
        trainer.close()
    acc = summary["accounting"]
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 7)) and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["version_lag"] <= 1 for m in metrics)
    assert metrics[0]["batches"].count(50) == 1, "the regenerated batch is trained on"
    assert acc["regenerated"] >= stale.stats.rolled_out > 0
    assert "worker" in killed and acc["retried"] >= 1, (killed, acc)
    assert len(before & after) == 2, "the two killed actors were restarted in new processes"
    assert acc["rolled_out"] >= acc["trained_on"] > 0 and acc["scored"] == acc["rolled_out"]
    assert (tmp_path / "checkpoints" / "latest.json").is_file()
    # The ranks hold shards of one model (the optimiser state is in the sharded checkpoint) and stepped together.
    assert all(s["optimizer"] is None for s in states) and states[0]["scheduler"] == states[1]["scheduler"]

    # The step-3 checkpoint (two ranks' shards) resumes on one learner: resharded, the run goes on from step 3.
    from ar2dlm_ray.cluster.driver import train

    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in (ckpts / "step_0000003" / "learner").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    (ckpts / "latest.json").write_text(json.dumps({"checkpoint": "step_0000003", "step": 3}))
    one = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"num_workers": 1})})
    resumed = train(one, resume=True, log=lambda *a: None, allow_change=("learner.num_workers",))
    again = _metrics(tmp_path)
    assert [m["step"] for m in again] == list(range(1, 7)) and again[:3] == metrics[:3]
    assert all(len(m["batches"]) == 1 and math.isfinite(m["loss"]) for m in again[3:])
    assert resumed["accounting"]["trained_on"] > acc["trained_on"] // 2


@pytest.mark.slow
def test_stale_batch_is_dropped_and_duplicates_are_discarded(micro_teacher, tmp_path, local_ray):
    from ar2dlm_ray.cluster.driver import RayTrainer

    # A bound of 3: the injected stale batch was never admitted, yet the driver replaces it as a dropped one,
    # which puts a real batch one step later than planned; under a bound of 1 a loaded machine could then
    # drop that one as stale too.
    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": 3, "learner.max_staleness": 3, "learner.stale_policy": "drop"}))
    trainer = RayTrainer(cfg, lambda *a: None)
    try:
        trainer.on_learners("publish", 0)
        stale = ray.get(trainer.workers[0].produce.remote(50, 0, to_queue=False))
        stale.stats.version = -5
        trainer.queue.put(stale)
        # Batch 0 delivered twice ahead of the driver's own delivery of it: a worker that died after putting
        # its batch, which the driver then had redone. It must be trained once.
        first = ray.get(trainer.workers[0].produce.remote(0, 0, to_queue=False))
        trainer.queue.put(first)
        trainer.queue.put(first)
        summary = trainer.run()
    finally:
        trainer.close()
    acc, delivery = summary["accounting"], summary["delivery"]
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    trained = [b for m in metrics for b in m["batches"]]
    assert trained == [0, 1, 2], "each batch trained once, none lost"
    assert acc["dropped_stale"] == stale.stats.rolled_out > 0 and acc["regenerated"] == 0
    assert acc["discarded_duplicates"] == 2 * first.stats.rolled_out
    assert delivery["trained_ids"] == [0, 1, 2] and delivery["dropped_ids"] == [50]
    assert delivery["discarded_duplicates"] == 2 and delivery["discarded_ids"] == [0]
    assert delivery["consumed"] == 6 == delivery["trained"] + delivery["dropped"] + delivery["discarded_duplicates"]
    assert acc["trained_on"] == 3 * cfg.train.rollout_batch_size


@pytest.mark.slow
def test_dead_learner_stops_with_one_line_and_a_run_to_a_storage_uri_resumes_exactly(micro_teacher, tmp_path,
                                                                                     local_ray, local_reference):
    """The learner dies after step 3: the run stops with one line, resumable. Its train.out_dir is a storage URI
    (file:// here, the same code as s3://): learner rank 0 uploads the student from its node (checkpoints,
    final/), the driver the trainer state and latest.json; on --resume each learner downloads the student on its
    node, and the run repeats the local trainer's."""
    from ar2dlm_ray.cluster.driver import RayTrainer
    from ar2dlm_ray.config import RunError

    ref, local_acc = local_reference
    store = tmp_path / "store" / "run"
    cfg = _ray_cfg(micro_teacher, f"file://{store}", **{"train.checkpoint_every": 2})
    trainer = RayTrainer(cfg, lambda *a: None)
    record = trainer._record

    def record_then_kill(results, step_s):  # fault injection: the learner dies after step 3
        out = record(results, step_s)
        if out["step"] == 3:
            ray.kill(trainer.learners[0], no_restart=True)
        return out

    trainer._record = record_then_kill
    try:
        with pytest.raises(RunError, match="learner-0 failed at step 4") as err:
            trainer.run()
    finally:
        trainer.close()
    assert err.value.resumable and "\n" not in str(err.value)
    ckpts = store / "checkpoints"
    assert [p.name for p in ckpts.glob("step_*")] == ["step_0000002"]
    assert list((ckpts / "step_0000002" / "student").glob("*.safetensors"))
    resumed = RayTrainer(cfg, lambda *a: None)
    try:
        summary = resumed.run(resume=True)
    finally:
        resumed.close()
    got = _metrics(store)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)) < 1e-5
    for key, value in local_acc.items():
        assert summary["accounting"][key] == value, key
    assert summary["final_student"] == f"file://{store}/final"
    assert (store / "final" / "ar2dlm_student.json").is_file()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004"]
    assert json.loads((store / "summary.json").read_text())["accounting"] == summary["accounting"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_driver_resumes_exactly(micro_teacher, tmp_path, local_ray, local_reference, sig):
    """`ar2dlm train` (mode=ray, on this cluster) killed after its step-2 checkpoint; `--resume` repeats the
    rest exactly as the local trainer ran it. SIGTERM (`ray job stop`) first checkpoints the step in progress."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ref, local_acc = local_reference
    gcs = ray.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "ar2dlm_ray.cli", "train", "--config", "configs/micro.yaml",
            *ray_overrides(micro_teacher, tmp_path, **{"mode": "ray", "ray.address": gcs, "learner.max_staleness": 0,
                                                       "train.checkpoint_every": 2})]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=300)
    assert metrics.exists(), err
    stopped = len(_metrics(tmp_path))
    assert stopped in (3, 4), "the kill did not land mid-run"
    ckpts = {p.name for p in (tmp_path / "checkpoints").glob("step_*")}
    if sig == "SIGTERM":
        assert proc.returncode == 2 and f"stopped by SIGTERM after step {stopped}" in err, err
        assert f"step_{stopped:07d}" in ckpts
    else:
        assert ckpts == {"step_0000002"}
    from ar2dlm_ray.cli import main

    assert main([*argv[3:], "--resume"]) == 0  # the same command in this process: a process start less
    got = _metrics(tmp_path)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)) < 1e-5
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key, value in local_acc.items():
        assert summary["accounting"][key] == value, key


def test_pools_that_do_not_fit_fail_with_the_shortfall_and_hold_nothing(micro_teacher, tmp_path, local_ray,
                                                                        monkeypatch):
    """On a cluster (not an embedded Ray) the pools are reserved first. A shortfall on a cluster that no
    autoscaler can grow (this one) fails at once; on one that could, when it lasts past ray.startup_timeout_s.
    Either is one message per resource, and every reservation is released."""
    import time

    from ar2dlm_ray.cluster import placement
    from ar2dlm_ray.cluster.driver import RayTrainer
    from ar2dlm_ray.config import StartupError

    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "rollout.num_workers": 12, "teacher.pool.num_gpus": 1, "ray.startup_timeout_s": 60}))
    deadline = time.monotonic() + 60  # a Ray started moments ago has no monitor report yet (it may still grow)
    while placement.can_grow() and time.monotonic() < deadline:
        time.sleep(0.5)
    with pytest.raises(StartupError) as err:
        RayTrainer(cfg, lambda *a: None)
    assert str(err.value) == ("the pools do not fit the cluster (CPU: pools need 14, cluster has 8; GPU: pools need 1, "
                              "cluster has 0) and no autoscaler can add nodes to it; add nodes (`ray start --address "
                              "...` on another machine), or lower the pool sizes / per-actor resources")
    monkeypatch.setattr(placement, "can_grow", lambda: True)  # as if an autoscaler might add nodes
    cfg.ray.startup_timeout_s = 2
    before = set(ray.util.placement_group_table())
    start = time.monotonic()
    with pytest.raises(StartupError) as err:
        RayTrainer(cfg, lambda *a: None)
    assert time.monotonic() - start < 30
    assert str(err.value) == ("the pools could not be placed within ray.startup_timeout_s=2s (CPU: pools need 14, "
                              "cluster has 8; GPU: pools need 1, cluster has 0); add nodes, or lower the pool sizes "
                              "/ per-actor resources")
    states = {g["name"]: g["state"] for pg_id, g in ray.util.placement_group_table().items() if pg_id not in before}
    assert len(states) == 3 and set(states.values()) == {"REMOVED"}, states
    assert not any(a["name"].startswith(("rollout-", "teacher-", "learner-"))
                   for a in ray.util.list_named_actors(all_namespaces=True))


def test_a_config_that_cannot_fit_its_gpus_is_refused_before_any_actor_starts(local_ray, tmp_path):
    """The memory plan (plan.py) of the roles on GPUs, against ray.gpu_memory_gb (or the GPU type Ray reports):
    one line naming the role, its need, the GPU and settings that fit; no actor, no reservation."""
    from ar2dlm_ray.cluster.driver import RayTrainer
    from ar2dlm_ray.config import ConfigError

    before = set(ray.util.placement_group_table())
    cfg = load_config("configs/qwen3_0.6b.yaml", [f"train.out_dir={tmp_path}", "ray.gpu_memory_gb=16",
                                                  "logging.run_name=too-big"])
    with pytest.raises(ConfigError) as err:
        RayTrainer(cfg, lambda *a: None)
    message = str(err.value)
    assert "needs" in message and "the GPU has 16 GB" in message and "\n" not in message, message
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "too-big"]
    assert set(ray.util.placement_group_table()) == before
