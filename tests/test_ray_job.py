"""End to end as a user runs it: a local Ray head started with `ray start`, the training job submitted
with `ray job submit --working-dir .`, its log checked, the Prometheus endpoint scraped, and a real
Prometheus server (`make prometheus`) running the shipped scrape configuration answering a PromQL query."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from ar2dlm_ray.cluster.metrics import METRIC_NAMES

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"{process.args[0]} exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answered at {url}")


def _start_prometheus(tmp_path: Path, metrics_port: int) -> tuple[subprocess.Popen, int]:
    """The shipped deploy/prometheus/prometheus.yml, its service discovery file (which Ray writes for the
    newest head on the machine) replaced by one naming this test's head, scraping every second."""
    binary = shutil.which("prometheus")
    assert binary, "no prometheus binary on PATH: run `make prometheus` (Debian's package)"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = tmp_path / "ray_targets.json"
    targets.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{metrics_port}"]}]))
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(targets)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    server = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"), start_new_session=True)
    _wait_for(f"http://127.0.0.1:{port}/-/ready", server, 60)
    return server, port


def _promql(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, then SIGKILL: a head's raylet outlives its GCS by 30 s or more."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def private_head(num_cpus: int, *options: str):
    """A Ray head of the test's own, on ports of its own: (GCS port, dashboard port, the environment that
    reaches it). `--block` in its own session: stopping its process group stops exactly this cluster (`ray
    stop` would stop every Ray on the machine, by process name)."""
    port, dash = _free_port(), _free_port()
    # Ray 2.60 turns token authentication on by default; a loopback test cluster opts out on both sides.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--num-cpus={num_cpus}",
         # Not the default agent port: another Ray on the machine (a CI run) may hold it, and then no job
         # can be submitted ("No available agent").
         f"--dashboard-agent-listen-port={_free_port()}", *options],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{dash}/api/version", head)
        yield port, dash, env
    finally:
        _stop(head)
        # `ray stop` would also forget the cluster; without this a later ray.init() tries to join it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


@pytest.fixture(scope="module")
def head():
    """One private head for the tests that submit to a plain cluster (starting one costs seconds):
    (GCS port, dashboard port, environment, metrics export port)."""
    prom = _free_port()
    with private_head(6, f"--metrics-export-port={prom}", '--system-config={"metrics_report_interval_ms": 1000}') \
            as (port, dash, env):
        yield port, dash, env, prom


@pytest.mark.slow
def test_ray_job_submit_end_to_end(micro_teacher, tmp_path, tmp_path_factory, head):
    port, dash, env, prom = head
    _submit_and_check(micro_teacher, tmp_path, tmp_path_factory, dash, prom, env)


def _submit_and_check(micro_teacher, tmp_path, tmp_path_factory, dash: int, prom: int, env: dict) -> None:
    server = None
    try:
        prom_dir = tmp_path_factory.mktemp("prometheus")
        server, server_port = _start_prometheus(prom_dir, prom)
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
        assert "[ray] connected to" in log and "[train] done: 3 steps" in log
        assert re.search(r"^\[train\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 3/3 loss [\d.]+ tokens/s \d+ "
                         r"eta 00:00:00 drops 0 ", log, flags=re.M), log[-4000:]
        # Ray's warning about actor constructor arguments in the object store (an actor handle among a
        # restartable actor's arguments) was in every job log.
        assert "constructor arguments" not in log, log[-4000:]
        # The learner's polling of an empty queue used to raise `Empty` in the queue actor: a "failed" task
        # each time. (Calls still waiting on the queue when the pools are stopped end as WORKER_DIED.)
        from ray.util.state import list_tasks

        failed = list_tasks(address=f"http://127.0.0.1:{dash}", filters=[("state", "=", "FAILED")])
        raised = [(t.name, t.error_type) for t in failed if t.error_type == "TASK_EXECUTION_EXCEPTION"]
        assert not raised, raised
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
        assert [e.value for e in events.Scalars("ray/pool_size/rollout")] == [1.0] * 3
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
        # The loss as a Grafana panel asks for it, labelled with pool, actor and run.
        deadline = time.time() + 60
        while not (samples := _promql(server_port, "ray_ar2dlm_loss")) and time.time() < deadline:
            time.sleep(1)
        assert samples, (prom_dir / "prometheus.log").read_text()[-3000:]
        labels = samples[0]["metric"]
        assert labels["pool"] == "learner" and labels["actor"] == "learner-0", labels
        assert labels["run"].startswith(f"{tmp_path.name}-"), labels
        assert {s["metric"]["actor"] for s in _promql(server_port, "ray_ar2dlm_teacher_tokens_per_s")} == {"teacher-0"}
    finally:
        if server is not None:
            _stop(server)


@pytest.mark.slow
def test_two_runs_share_a_cluster_and_a_third_with_a_taken_name_is_refused(micro_teacher, tmp_path, head):
    """Two drivers on one private head, each in a Ray namespace of its own, both finish with exact accounting;
    a third started at the same time under one's run name is refused in one line that names the other job and
    the setting that separates them, and its clean-up leaves the other's actors alone (the other finishes)."""
    from test_ray import ray_overrides
    from test_ray_pools import _check_accounting, _metrics

    port, dash, env, _ = head
    steps = 60  # long enough for `ar2dlm pools show` (a Ray driver, seconds to start) to meet both runs

    def driver(name: str, *extra: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "ar2dlm_ray.train", "--config", "configs/micro.yaml",
                f"ray.address=127.0.0.1:{port}", *ray_overrides(micro_teacher, tmp_path / name,
                                                               **{"train.max_steps": steps}), *extra]
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    runs = {"a": driver("a", "logging.run_name=shared"), "b": driver("b"),
            "c": driver("c", "logging.run_name=shared")}
    shown = _pools_while_running(dash, port, env, runs)
    done = {name: (proc.communicate(timeout=400), proc.returncode) for name, proc in runs.items()}
    assert shown["which"] and shown["shared"], shown  # `ar2dlm pools` told the two runs apart, by the dashboard URL
    failed = [name for name, (_, rc) in done.items() if rc != 0]
    assert len(failed) == 1 and failed[0] in "ac", {n: (rc, err[-3000:]) for n, ((_, err), rc) in done.items()}
    (_, err), rc = done[failed[0]]
    errors = [line for line in err.splitlines() if line.startswith("ar2dlm: error:")]  # beside Ray's INFO lines
    assert rc == 2 and len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert re.fullmatch(r"ar2dlm: error: job \w+ \(driver pid \d+, run shared\) already runs in Ray namespace "
                        r"'shared' on this cluster; give this run a name of its own: logging\.run_name=<name> \(or "
                        r"ray\.namespace=<name>\)", errors[0]), err
    for name in {"a", "b", "c"} - set(failed):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["steps"] == steps
        _check_accounting(summary, _metrics(tmp_path / name), 8)
    assert not (tmp_path / failed[0] / "metrics.jsonl").exists()  # refused before any work


def _pools_while_running(dash: int, port: int, env: dict, runs: dict) -> dict:
    """`ar2dlm pools show` by the dashboard URL while the runs go on: without --run it names the runs on the
    cluster; with --run shared it names the cluster and the run and shows that run's pools."""
    shown: dict = {"which": None, "shared": None}
    url = f"http://127.0.0.1:{dash}"
    while not all(shown.values()) and any(proc.poll() is None for proc in runs.values()):
        which = subprocess.run([sys.executable, "-m", "ar2dlm_ray.cli", "pools", "show", "--address", url],
                               env=env, capture_output=True, text=True, timeout=120)
        if re.search(rf"which run on the Ray cluster at [\d.]+:{port}\? the runs there: b-\d{{8}}-\d{{6}}, shared;",
                     which.stderr):
            shown["which"] = which.stderr
        one = subprocess.run([sys.executable, "-m", "ar2dlm_ray.cli", "pools", "show", "--address", url, "--run",
                              "shared"], env=env, capture_output=True, text=True, timeout=120)
        named = rf"\[pools\] cluster at [\d.]+:{port} \(dashboard {url}\), run 'shared'"
        if one.returncode == 0 and re.fullmatch(named, one.stdout.partition("\n")[0]):
            # The object alone: Ray may print its own warnings after it (a raylet's "N workers started").
            shown["shared"] = json.JSONDecoder().raw_decode(one.stdout[one.stdout.index("{"):])[0]
    return shown


def _cluster_recipe_commands() -> list[str]:
    """docs/cluster.md's single-machine cluster commands, one per line, without comments."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "ray start --head" in b and "submit.sh" in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_cluster_recipe_commands_run_as_written(micro_teacher, tmp_path):
    """docs/cluster.md's commands from a fresh clone, with the venv not on PATH: the head started by
    `.venv/bin/ray start` finds only a python without the dependencies, so a plain `ray job submit` fails
    with "No module named ..." (the issue), and deploy/submit.sh (deploy/runtime_env.yaml) runs. Changed for
    the test only: its own ports, 4 CPUs on a small machine, a token file of its own instead of
    ~/.ray/auth_token, and a short run of the micro teacher; `make setup` has already run."""
    commands = _cluster_recipe_commands()
    assert commands[0] == "make setup"
    port, dash = _free_port(), _free_port()
    token = tmp_path / "auth_token"
    token.write_text(os.urandom(32).hex())
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    env = {**os.environ, "PATH": path, "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ADDRESS": f"http://127.0.0.1:{dash}",
           "OMP_NUM_THREADS": "1"}
    env.pop("RAY_AUTH_MODE", None)
    short = [f"model.teacher={micro_teacher}", "train.max_steps=2", "train.rollout_batch_size=8",
             "data.num_prompts=64", "sampler.max_new_tokens=8", "curriculum.min_len=4", "curriculum.max_len=8",
             "teacher.pool.num_cpus=1"]
    head = None
    try:
        for command in commands[1:]:
            if command.startswith("export "):
                name, value = command.removeprefix("export ").split("=", 1)
                env[name] = value
            elif "get-auth-token --generate" in command:
                continue  # the token file above
            elif "ray start --head" in command:
                start = command.partition(" > ")[0]  # the test keeps the head's output and process group
                head = subprocess.Popen(
                    ["bash", "-c", f"{start} --port={port} --dashboard-port={dash} --num-cpus=4 "
                                   f"--dashboard-agent-listen-port={_free_port()} --ray-client-server-port={_free_port()}"],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "head.log").open("w"),
                    start_new_session=True)
                # Until the dashboard and the head's job agent are up, a submission is refused without creating
                # a job. (The dashboard asks for the token even for its version.)
                deadline = time.time() + 150
                while True:
                    assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                    plain = subprocess.run(
                        [str(BIN / "ray"), "job", "submit", "--", "python", "-m", "ar2dlm_ray.train", "--config",
                         "configs/micro.yaml", f"train.out_dir={tmp_path / 'plain'}", *short],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
                    refused = re.search("No available agent|Failed to connect", plain.stdout + plain.stderr)
                    if not refused or time.time() > deadline:
                        break
                    time.sleep(2)
                assert plain.returncode != 0 and "No module named" in plain.stdout, plain.stdout[-3000:]
            elif command.startswith("deploy/submit.sh") and "--resume" not in command:
                out_dir = tmp_path / "run"
                line = re.sub(r"train\.out_dir=\S+", f"train.out_dir={out_dir}", command)
                job = subprocess.run(["bash", "-c", f"{line} {' '.join(short)}"], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=300)
                log = job.stdout + job.stderr
                assert job.returncode == 0 and "[train] done: 2 steps" in log, log[-4000:]
                assert (out_dir / "final" / "ar2dlm_student.json").is_file()
        assert head is not None and out_dir.is_dir(), commands
    finally:
        if head is not None:
            _stop(head)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
