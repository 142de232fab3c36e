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
    from ar2dlm_ray.cluster.placement import pool_demand

    cfg = load_config(ROOT / "configs" / "qwen3_4b.yaml")
    demand = pool_demand(cfg)
    t, r, lr = cfg.teacher, cfg.rollout, cfg.learner
    assert demand["GPU"] == t.num_replicas * t.pool.num_gpus + r.num_workers * r.num_gpus + lr.num_workers * lr.num_gpus
    assert demand["teacher_node"] == t.num_replicas and demand["student_node"] == r.num_workers + lr.num_workers


def test_submit_uploads_only_tracked_files(tmp_path):
    """An untracked secret next to the code never leaves the machine; tracked files (with their working-tree
    content) do. A stand-in `ray` on PATH records what `ray job submit` was given."""
    import os
    import subprocess

    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    (repo / "deploy" / "submit.sh").write_text((ROOT / "deploy" / "submit.sh").read_text())  # this one, not HEAD's
    (repo / ".env").write_text("SECRET=1\n")
    (repo / "configs" / "micro.yaml").write_text((repo / "configs" / "micro.yaml").read_text() + "# edited\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/usr/bin/env bash\nwhile [[ $1 != --working-dir ]]; do shift; done\n'
                                 'cd "$2" && find . -type f | sort > "$RECORD" && shift 2 && echo "$@" >> "$RECORD"\n')
    (bin_dir / "ray").chmod(0o755)
    record = tmp_path / "record"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}
    subprocess.run(["bash", str(repo / "deploy" / "submit.sh"), "configs/micro.yaml", "train.max_steps=2"],
                   check=True, env=env, cwd=repo)
    lines = record.read_text().splitlines()
    files = {ln.removeprefix("./") for ln in lines[:-1]}
    tracked = set(subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split())
    assert files == tracked and ".env" not in files
    assert lines[-1] == "-- python -m ar2dlm_ray.train --config configs/micro.yaml train.max_steps=2"
    (repo / "configs" / "mine.yaml").write_text("mode: local\n")
    proc = subprocess.run(["bash", str(repo / "deploy" / "submit.sh"), "configs/mine.yaml"], env=env, cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not tracked by git" in proc.stderr


def test_shipped_cluster_files_keep_token_authentication_on():
    cluster = yaml.safe_load((ROOT / "deploy" / "cluster.yaml").read_text())
    schema = json.loads((Path(importlib.import_module("ray").__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    import jsonschema

    jsonschema.validate(cluster, schema)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    token_path = next(o.split("=", 1)[1] for o in cluster["docker"]["run_options"] if "RAY_AUTH_TOKEN_PATH" in o)
    assert token_path in cluster["file_mounts"]
    assert "--gpus all" not in cluster["docker"]["run_options"]  # the head has no GPU
    job = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    for path in (p for p in (ROOT / "deploy").rglob("*") if p.is_file()):
        assert "RAY_AUTH_MODE=disabled" not in path.read_text() and "value: disabled" not in path.read_text(), path
