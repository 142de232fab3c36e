"""The deployment files name things that exist: the entrypoint module, the configs (which validate),
and the custom resources the configs' pools ask for are offered by the node groups."""

import importlib
import json
import re
import shlex
from pathlib import Path

import yaml

from ar2dlm_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _entry(command: str) -> tuple[str, str]:
    """(module, config) of a `python -m MODULE --config FILE ...` command."""
    argv = shlex.split(command)
    return argv[argv.index("-m") + 1], argv[argv.index("--config") + 1]


def _check_entrypoint(command: str):
    module, config = _entry(command)
    assert callable(getattr(importlib.import_module(module), "main")), module
    assert (ROOT / config).is_file(), config
    return load_config(ROOT / config)


def _pool_resources(cfg) -> set[str]:
    return {*cfg.rollout.resources, *cfg.learner.resources, *cfg.teacher.pool.resources}


def test_rayjob_manifest_names_existing_config_and_offers_its_resources():
    job = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    cfg = _check_entrypoint(job["spec"]["entrypoint"])
    assert cfg.mode == "ray" and cfg.model.device == "cuda"
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"student", "teacher"}
    offered = {}
    for name, group in groups.items():
        offered[name] = set(json.loads(json.loads(group["rayStartParams"]["resources"])))
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    assert set(cfg.teacher.pool.resources) <= offered["teacher"]
    assert set(cfg.rollout.resources) | set(cfg.learner.resources) <= offered["student"]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == importlib.import_module("ray").__version__


def test_ray_up_cluster_offers_every_pool_resource():
    cluster = yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())
    offered = {r for t in cluster["available_node_types"].values() for r in t["resources"]}
    configs = sorted(ROOT.glob("configs/qwen3_*.yaml"))
    assert {c.stem for c in configs} >= {"qwen3_0.6b", "qwen3_1.7b", "qwen3_4b", "qwen3_8b"}
    for config in configs:
        assert _pool_resources(load_config(config)) <= offered, config


def test_submit_script_and_images_use_the_entrypoint():
    submit = (ROOT / "deploy" / "submit.sh").read_text()
    assert "python -m ar2dlm_ray.train --config" in submit and "ray job submit" in submit
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
        _check_entrypoint(" ".join(cmd))
    # The CPU image installs what the Makefile installs.
    make = (ROOT / "Makefile").read_text()
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    for pin in re.findall(r"pip install .*?(torch==[\w.]+|-e '\.\[dev\]')", make):
        assert pin in cpu, pin


def test_pool_demand_sums_every_pool():
    from ar2dlm_ray.cluster.driver import pool_demand

    cfg = load_config(ROOT / "configs" / "qwen3_4b.yaml")
    demand = pool_demand(cfg)
    t, r, lr = cfg.teacher, cfg.rollout, cfg.learner
    assert demand["GPU"] == t.num_replicas * t.pool.num_gpus + r.num_workers * r.num_gpus + lr.num_workers * lr.num_gpus
    assert demand["teacher_node"] == t.num_replicas and demand["student_node"] == r.num_workers + lr.num_workers
