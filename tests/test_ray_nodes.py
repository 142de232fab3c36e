"""Where a run lives on a multi-node Ray, and losing a node: a two-node local cluster
(ray.cluster_utils.Cluster) whose nodes run in another working directory than the driver; the learner on the
second node, the producers on the head with the driver."""

import json
import os
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from ar2dlm_ray.config import ConfigError, RunError, load_config

from test_ray import _metrics, local_reference, ray_overrides  # noqa: F401 - local_reference is a fixture

CONFIG = os.path.abspath("configs/micro.yaml")
# Ray declares a node dead after this many missed health checks of this period (defaults: about 15 s).
FAST_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 500}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The head (driver, producers) and a node with the `far` resource (the learner); the raylets' working
    directory is not the driver's, so a relative path means something else to them."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("raylets"))
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "_system_config": FAST_DEATH})
        far = cluster.add_node(num_cpus=1, resources={"far": 1})
    finally:
        os.chdir(cwd)
    ray.init(address=cluster.address, namespace="ar2dlm-nodes", log_to_driver=False)
    yield cluster, {"far": far}
    ray.shutdown()
    cluster.shutdown()


def _cfg(teacher, out_dir, **extra):
    return load_config(CONFIG, ray_overrides(teacher, out_dir, mode="ray", **{
        "learner.max_staleness": 0, "learner.resources": "{far: 1}", "train.checkpoint_every": 2, **extra}))


@pytest.mark.slow
def test_lost_node_is_named_and_a_relative_run_resumes_exactly(micro_teacher, tmp_path, monkeypatch, two_nodes,
                                                               local_reference):
    """train.out_dir=run (relative) from the driver's directory: the learner on the other node writes the
    student where the driver writes the trainer state. That node is killed (SIGKILL, every process) after the
    step-2 checkpoint: the run stops with one line naming the node and the learner; on a new node --resume
    repeats the reference exactly, and summary.json counts every batch of the run."""
    from ar2dlm_ray.cluster.driver import RayTrainer

    cluster, nodes = two_nodes
    ref, local_acc = local_reference
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(micro_teacher, "run")
    logs: list[str] = []
    trainer = RayTrainer(cfg, logs.append)
    far = trainer.placement["learner"][0]["node_id"]
    assert far == nodes["far"].node_id and trainer.cfg.train.out_dir == str(tmp_path / "run")
    checkpoint = trainer.checkpoint

    def checkpoint_then_lose_node(next_batch):  # fault injection: the learner's node dies after the checkpoint
        where = checkpoint(next_batch)
        cluster.remove_node(nodes["far"], allow_graceful=False)
        return where

    trainer.checkpoint = checkpoint_then_lose_node
    try:
        with pytest.raises(RunError) as err:
            trainer.run()
    finally:
        trainer.close()
    line = str(err.value)
    assert line.startswith(f"node {far[:8]} (") and " was lost with learner-0: learner-0 failed at step " in line, line
    assert err.value.resumable and "\n" not in line
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "student").is_dir()

    nodes["far"] = cluster.add_node(num_cpus=1, resources={"far": 1})
    resumed = RayTrainer(cfg, logs.append)
    try:
        summary = resumed.run(resume=True)
    finally:
        resumed.close()
    got = _metrics(tmp_path / "run")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)) < 1e-5
    assert summary["final_student"] == str(tmp_path / "run" / "final")
    assert (tmp_path / "run" / "final" / "ar2dlm_student.json").is_file()
    assert summary["delivery"]["trained_ids"] == [0, 1, 2, 3]
    for key, value in local_acc.items():
        assert summary["accounting"][key] == value, key
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["delivery"]["trained"] == 4


def test_a_run_directory_the_learner_node_cannot_see_is_refused(micro_teacher, tmp_path, monkeypatch, two_nodes):
    """Fault injection: the learner's node reads nothing at the driver's path (as a node without the driver's
    filesystem would); the run is refused before any actor starts, and holds nothing."""
    from ar2dlm_ray.cluster import nodes
    from ar2dlm_ray.cluster.driver import SHARED_ACTORS, RayTrainer, _exists

    def all_free(timeout_s: float = 30) -> bool:
        """Every CPU of the cluster free, waiting for placement groups and actors to be removed (asynchronous)."""
        deadline = time.monotonic() + timeout_s
        while ray.available_resources().get("CPU") != ray.cluster_resources().get("CPU"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    assert all_free()  # the previous test's actors may still be releasing theirs
    monkeypatch.setattr(nodes, "_read", ray.remote(num_cpus=0)(lambda path: None))
    with pytest.raises(ConfigError) as err:
        RayTrainer(_cfg(micro_teacher, tmp_path / "run"), lambda *a: None)
    line = str(err.value)
    assert line.startswith(f"train.out_dir {tmp_path / 'run'} is not visible from node ") and "\n" not in line
    assert "where the learners run" in line and "s3://" in line
    assert not any(_exists(name) for name in SHARED_ACTORS)
    assert not list((tmp_path / "run").iterdir())  # the probe is gone
    assert all_free(), ray.available_resources()


LISTENERS = """
import json, os, sys
import psutil, ray
from ar2dlm_ray.cluster.driver import connect
from ar2dlm_ray.config import load_config

lines = []
connect(load_config("configs/micro.yaml", ["mode=ray", "ray.num_cpus=1"]), lines.append)
actor = ray.remote(num_cpus=0)(type("Probe", (), {"pid": lambda self: os.getpid()})).remote()
ray.get(actor.pid.remote())  # an actor's own gRPC server listens too
found = []
for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        found += [[proc.name(), c.laddr.ip, c.laddr.port] for c in proc.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:  # a worker that exited meanwhile
        pass
print(json.dumps({"log": lines, "listening": found}))
"""


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only():
    """Every socket the embedded Ray's processes listen on (GCS, raylet, agents, dashboard, an actor) is on
    127.0.0.1, as the log line says."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in out["listening"]}
    assert {"gcs_server", "raylet"} <= names and len(out["listening"]) >= 5, out
    exposed = [entry for entry in out["listening"] if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert not exposed, exposed
    assert out["log"][0].startswith("[ray] started an embedded Ray: GCS 127.0.0.1:"), out["log"]
    assert " listen on 127.0.0.1 only; dashboard on 127.0.0.1:" in out["log"][0] and len(out["log"]) == 1, out["log"]


def test_a_dashboard_beyond_loopback_is_warned_about_with_the_token_role():
    from ar2dlm_ray.cluster.nodes import dashboard_warning

    assert dashboard_warning("127.0.0.1") is None
    warning = dashboard_warning("0.0.0.0")
    assert warning.startswith("[ray] warning: ray.dashboard_host=0.0.0.0 opens the dashboard and its job API")
    assert "guarded only by Ray's token" in warning and "\n" not in warning
