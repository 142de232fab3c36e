"""The command line as users call it: convert a real checkpoint, then sample from it with --json."""

import json
import subprocess
import sys


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "ar2dlm_ray.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_convert_then_sample_json(micro_teacher, tmp_path):
    out = tmp_path / "student"
    info = json.loads(_cli("convert", "--model", micro_teacher, "--out", str(out), "--block-size", "4",
                           "--no-shift").strip().splitlines()[-1])
    assert info["block_size"] == 4 and info["shift"] is False
    result = json.loads(_cli("sample", "--model", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                             "--steps-per-block", "4", "--remasking", "static", "--temperature", "0.8",
                             "--seed", "3", "--json").strip().splitlines()[-1])
    assert set(result) >= {"prompt_ids", "token_ids", "reveal_steps", "text", "forwards"}
    assert 0 < len(result["token_ids"]) <= 12 and len(result["reveal_steps"]) == len(result["token_ids"])
    assert all(0 <= r < 4 for r in result["reveal_steps"])
    blocks = (len(result["token_ids"]) + 3) // 4
    if len(result["token_ids"]) == 12:
        assert result["forwards"] == 4 * blocks
    else:  # ended at EOS: its block stops once everything up to the end is committed
        assert 4 * (blocks - 1) < result["forwards"] <= 4 * blocks


def test_help_lists_every_command():
    text = _cli("--help")
    for cmd in ("convert", "sample", "train", "teacher", "eval", "demo", "bench"):
        assert cmd in text


def test_a_stopped_run_ends_with_the_command_that_resumes_it(monkeypatch, capsys):
    """Inside `ray job submit`: deploy/submit.sh with the config as the user gave it (the job metadata's);
    elsewhere `ar2dlm train` (with mode=ray for the Ray entrypoint). The faults are injected into the driver:
    a lost learner, then Ctrl-C."""
    import ar2dlm_ray.cluster.driver as driver
    from ar2dlm_ray import cli, train
    from ar2dlm_ray.config import RunError

    fault: list = [RunError("learner-0 failed at step 4 (ActorDiedError)", resumable=True)]

    def fail(cfg, **kwargs):
        raise fault[0]

    monkeypatch.setattr(driver, "train", fail)
    args = ["--config", "configs/micro.yaml", "train.out_dir=/tmp/runs/x"]

    def last_line(code: int) -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (2, 130) and err, err
        return err[-1]

    assert last_line(train.main(args)) == (
        "ar2dlm: error: learner-0 failed at step 4 (ActorDiedError); continue from the last checkpoint with: "
        "ar2dlm train --config configs/micro.yaml train.out_dir=/tmp/runs/x mode=ray --resume")
    assert last_line(cli.main(["train", *args, "mode=ray"])).endswith(
        "with: ar2dlm train --config configs/micro.yaml train.out_dir=/tmp/runs/x mode=ray --resume")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "x-20260101-000000", "config": "../mine.yaml"}}))
    fault[0] = KeyboardInterrupt()
    assert last_line(train.main(args)) == (
        "ar2dlm: error: interrupted (SIGINT); the checkpoints written so far are whole; continue from the last "
        "checkpoint with: deploy/submit.sh ../mine.yaml train.out_dir=/tmp/runs/x --resume")


def test_pools_address_auto_is_refused_when_several_clusters_run_here(monkeypatch):
    """Ray's own `auto` would pick the newest cluster; `ar2dlm pools` names them and asks (the machine's state is
    injected: the real one depends on what else runs here)."""
    import pytest
    from ray._private import services

    from ar2dlm_ray.cluster.address import gcs_address
    from ar2dlm_ray.config import ConfigError

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({"10.0.0.1:6379", "10.0.0.1:6380"}))
    with pytest.raises(ConfigError) as err:
        gcs_address("auto")
    assert str(err.value) == ("--address auto: 2 Ray clusters run on this machine (10.0.0.1:6379, 10.0.0.1:6380); "
                              "give --address (the dashboard URL, e.g. http://127.0.0.1:8265, or the GCS address "
                              "host:6379)")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({"10.0.0.1:6379"}))
    assert gcs_address("auto") == "10.0.0.1:6379" and gcs_address("host:1") == "host:1"
