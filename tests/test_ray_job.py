"""End to end as a user runs it: a local Ray head started with `ray start`, the training job submitted
with `ray job submit --working-dir .`, its log checked, and the Prometheus endpoint scraped."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ar2dlm_ray.cluster.metrics import METRIC_NAMES

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, head: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard did not come up at {url}")


@pytest.mark.slow
def test_ray_job_submit_end_to_end(micro_teacher, tmp_path):
    port, dash, prom = _free_port(), _free_port(), _free_port()
    # Ray 2.60 turns token authentication on by default; a loopback test cluster opts out on both sides.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    # `--block` in its own session: stopping it stops exactly this cluster (`ray stop` would stop every
    # Ray on the machine, by process name).
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--metrics-export-port={prom}", "--num-cpus=4",
         '--system-config={"metrics_report_interval_ms": 1000}'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{dash}/api/version", head)
        # The dashboard answers before the head's job agent has registered; until then a submission is
        # refused (HTTP 500 "No available agent") without creating a job, so it is safe to retry.
        deadline = time.time() + 120
        while True:
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".", "--",
                 "python", "-m", "ar2dlm_ray.train", "--config", "configs/micro.yaml", f"model.teacher={micro_teacher}",
                 f"train.out_dir={tmp_path}", "train.max_steps=3", "train.rollout_batch_size=8", "data.num_prompts=64",
                 "sampler.max_new_tokens=8", "curriculum.min_len=4", "curriculum.max_len=8", "teacher.pool.num_cpus=1"],
                env=env, capture_output=True, text=True, timeout=300)
            if job.returncode == 0 or "No available agent" not in job.stderr + job.stdout or time.time() > deadline:
                break
            time.sleep(2)
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "[ray] connected to" in log and "[train] step 3/3 loss" in log and "[train] done: 3 steps" in log
        assert (tmp_path / "summary.json").is_file() and (tmp_path / "final" / "ar2dlm_student.json").is_file()
        wanted = {"ray_ar2dlm_loss", "ray_ar2dlm_weight_version", "ray_ar2dlm_rollouts_total",
                  "ray_ar2dlm_teacher_tokens_per_s", "ray_ar2dlm_learner_step_s", "ray_ar2dlm_version_lag"}
        assert wanted <= {f"ray_{n}" for n in METRIC_NAMES}
        seen: set = set()
        deadline = time.time() + 30
        while time.time() < deadline and not wanted <= seen:
            text = urllib.request.urlopen(f"http://127.0.0.1:{prom}", timeout=5).read().decode()
            seen = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_ar2dlm_")}
            time.sleep(1)
        assert wanted <= seen, sorted(seen)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # `ray stop` would also forget the cluster; without this a later ray.init() tries to join it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
