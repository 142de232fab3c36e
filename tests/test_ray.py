"""The Ray system on a real local Ray: it agrees with the local trainer step for step, and it survives
dying actors (retries counted), stale rollouts (regenerated) and a data-parallel learner group."""

import json
import math

import pytest
import ray

from ar2dlm_ray.config import load_config
from ar2dlm_ray.trainer import LocalTrainer

@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="ar2dlm-test", log_to_driver=False)
    yield
    ray.shutdown()


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


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_reference(micro_teacher, tmp_path_factory):
    """The local trainer's metrics for the settings the Ray runs must reproduce."""
    import torch

    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run one thread; keep the reductions identical
    try:
        LocalTrainer(load_config("configs/micro.yaml", ray_overrides(micro_teacher, out)), log=lambda *a: None).run()
    finally:
        torch.set_num_threads(threads)
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
    deltas = [abs(u["loss"] - v["loss"]) for a, b in zip(ref, got) for u, v in zip(a["updates"], b["updates"], strict=True)]
    assert len(deltas) == 8 and max(deltas) < 1e-5, deltas
    assert [m["version"] for m in got] == [0, 1, 2, 3] and all(m["version_lag"] == 0 for m in got)
    assert [m["tokens_trained"] for m in ref] == [m["tokens_trained"] for m in got]
    for key, value in local_acc.items():
        assert summary["accounting"][key] == value, key
    assert (tmp_path / "final" / "ar2dlm_student.json").is_file()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004"]


@pytest.mark.slow
def test_ray_resume_and_collective_transport_match_local(micro_teacher, tmp_path, local_ray, local_reference):
    from ar2dlm_ray.cluster.driver import train

    ref, _ = local_reference
    # A run stopped after its step-2 checkpoint (the local trainer's format), then resumed: steps 3-4 repeat.
    cfg = _ray_cfg(micro_teacher, tmp_path / "resume", **{"train.checkpoint_every": 2})
    summary = train(cfg, log=lambda *a: None)
    ckpts = tmp_path / "resume" / "checkpoints"
    (ckpts / "latest.json").write_text(json.dumps({"checkpoint": "step_0000002", "step": 2}))
    resumed = train(cfg, resume=True, log=lambda *a: None)
    again = _metrics(tmp_path / "resume")
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, again)) < 1e-5
    assert resumed["accounting"] == summary["accounting"]

    # The gloo broadcast transport (flat buckets) moves the same weights: the same losses again.
    train(_ray_cfg(micro_teacher, tmp_path / "collective", **{"learner.transport": "collective",
                                                               "rollout.num_workers": 2}), log=lambda *a: None)
    collective = _metrics(tmp_path / "collective")
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
    submit = trainer._submit

    def submit_then_kill(batch, *args):
        # Fault injection: the worker dies with this batch in flight, and a teacher replica dies too.
        submit(batch, *args)
        if batch == 5 and not killed:
            killed["worker"] = f"rollout-{batch % 2}"
            ray.kill(ray.get_actor(killed["worker"]), no_restart=False)
            ray.kill(ray.get_actor("teacher-1"), no_restart=False)

    trainer._submit = submit_then_kill
    try:
        before = {a["pid"] for a in trainer.placement["teacher"] + trainer.placement["rollout"]}
        # A rollout from a long-gone weight version arrives first: it must be regenerated, not trained on.
        ray.get(trainer.learners[0].publish.remote(0))
        stale = ray.get(trainer.workers[0].produce.remote(50, 0, to_queue=False))
        stale["stats"]["version"] = -5
        trainer.queue.put(stale)
        summary = trainer.run()
        after = {ray.get(a.info.remote())["pid"] for a in trainer.teachers + trainer.workers}
        weights = ray.get([lw.state.remote() for lw in trainer.learners])
    finally:
        trainer.close()
    acc = summary["accounting"]
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 7)) and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["version_lag"] <= 1 for m in metrics)
    assert metrics[0]["batches"].count(50) == 1, "the regenerated batch is trained on"
    assert acc["regenerated"] >= stale["stats"]["rolled_out"] > 0
    assert "worker" in killed and acc["retried"] >= 1, (killed, acc)
    assert len(before & after) == 2, "the two killed actors were restarted in new processes"
    assert acc["rolled_out"] >= acc["trained_on"] > 0 and acc["scored"] == acc["rolled_out"]
    assert (tmp_path / "checkpoints" / "latest.json").is_file()
    # Both ranks took identical optimiser steps (same averaged gradients).
    s0, s1 = (w["optimizer"]["state"] for w in weights)
    assert all((s0[k]["exp_avg"] - s1[k]["exp_avg"]).abs().max() == 0 for k in s0)


@pytest.mark.slow
def test_stale_batch_is_dropped_and_counted(micro_teacher, tmp_path, local_ray):
    from ar2dlm_ray.cluster.driver import RayTrainer

    cfg = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path, mode="ray", **{
        "train.max_steps": 3, "learner.max_staleness": 1, "learner.stale_policy": "drop"}))
    trainer = RayTrainer(cfg, lambda *a: None)
    try:
        ray.get(trainer.learners[0].publish.remote(0))
        stale = ray.get(trainer.workers[0].produce.remote(50, 0, to_queue=False))
        stale["stats"]["version"] = -5
        trainer.queue.put(stale)
        summary = trainer.run()
    finally:
        trainer.close()
    acc = summary["accounting"]
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(50 not in m["batches"] for m in metrics), "a stale batch was trained on"
    assert acc["dropped_stale"] == stale["stats"]["rolled_out"] > 0 and acc["regenerated"] == 0
    assert acc["trained_on"] == 3 * cfg.train.rollout_batch_size
