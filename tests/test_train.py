"""The local trainer on a really pretrained micro teacher: OPDLM lowers the on-policy KL, every recipe
runs, and a run killed mid-way resumes at the same step with the same data order."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from ar2dlm_ray.config import load_config
from ar2dlm_ray.evaluate import EvalData, on_policy_kl
from ar2dlm_ray.trainer import LocalTrainer


def _overrides(teacher, out_dir, **extra):
    base = {
        "model.teacher": teacher, "train.out_dir": str(out_dir), "logging.progress": "false",
        "train.rollout_batch_size": 16, "train.micro_batch_size": 16, "data.num_prompts": 640,
        "sampler.max_new_tokens": 16, "curriculum.min_len": 8, "curriculum.max_len": 16,
        "curriculum.warmup_steps": 4, "train.checkpoint_every": 100, "sampler.batch_size": 16,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_opdlm_lowers_on_policy_kl(micro_teacher, tmp_path):
    cfg = load_config("configs/micro.yaml", _overrides(micro_teacher, tmp_path, **{
        "train.max_steps": 24, "train.lr": 2e-3, "train.min_lr": 2e-4, "train.warmup_steps": 2}))
    trainer = LocalTrainer(cfg, log=lambda *a: None)
    data = EvalData(cfg, trainer.student.tokenizer, micro_teacher)
    prompts = data.text_prompts + [trainer.student.tokenizer.encode(e.prompt) for e in data.examples[:16]]

    def kl():
        return on_policy_kl(trainer.student, trainer.teacher, prompts, cfg.sampler, 16, seed=123)

    before = kl()
    summary = trainer.run()
    after = kl()
    assert summary["steps"] == 24 and summary["accounting"]["trained_on"] == 24 * 16
    assert after < 0.8 * before, (before, after)
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("recipe", ["bd3lm", "sft", "kd_off", "opdlm_off", "opdlm"])
def test_every_recipe_trains(recipe, micro_teacher, tmp_path):
    cfg = load_config("configs/micro.yaml", _overrides(micro_teacher, tmp_path, **{
        "train.recipe": recipe, "train.max_steps": 2, "data.num_prompts": 64}))
    summary = LocalTrainer(cfg, log=lambda *a: None).run()
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    acc = summary["accounting"]
    assert acc["prompts_consumed"] == 32 and acc["trained_on"] == acc["rolled_out"] > 0
    assert acc["tokens_trained"] == metrics[-1]["tokens_trained"] > 0
    assert acc["scored"] == (acc["rolled_out"] if recipe in ("kd_off", "opdlm_off", "opdlm") else 0)
    assert (tmp_path / "final" / "ar2dlm_student.json").is_file()


def _train_cmd(teacher, out_dir, *extra, steps=6, every=2, keep=2):
    return [sys.executable, "-m", "ar2dlm_ray.cli", "train", "--config", "configs/micro.yaml", *extra,
            *_overrides(teacher, out_dir, **{"train.max_steps": steps, "train.checkpoint_every": every,
                                             "train.keep_checkpoints": keep})]


def _train_here(cmd) -> None:
    """Run `cmd` (a _train_cmd) in this process on 1 thread, as the OMP_NUM_THREADS=1 subprocesses run it: a
    process start less for what need not be killed."""
    from conftest import one_torch_thread

    from ar2dlm_ray.cli import main

    with one_torch_thread():
        assert main(cmd[3:]) == 0


@pytest.fixture(scope="module")
def reference_run(micro_teacher, tmp_path_factory):
    """The uninterrupted run (6 steps) that a killed and resumed one must repeat."""
    out = tmp_path_factory.mktemp("reference")
    _train_here(_train_cmd(micro_teacher, out))
    return out


def _kill_after_step_3(cmd, env, metrics):
    """SIGKILL a training run once `metrics` has 3 steps (the run checkpoints at step 2)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_after_kill_continues_with_same_steps_and_data(micro_teacher, tmp_path, reference_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_dir, run_dir = reference_run, tmp_path / "run"
    _kill_after_step_3(_train_cmd(micro_teacher, run_dir), env, run_dir / "metrics.jsonl")
    assert len(_metrics(run_dir)) in (3, 4), "kill did not land mid-run"
    _train_here(_train_cmd(micro_teacher, run_dir, "--resume"))
    ref, got = _metrics(ref_dir), _metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, 7))
    for a, b in zip(ref, got):
        assert a["batch"] == b["batch"] and a["tokens_trained"] == b["tokens_trained"]
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    ref_acc = json.loads((ref_dir / "summary.json").read_text())["accounting"]
    got_acc = json.loads((run_dir / "summary.json").read_text())["accounting"]
    assert ref_acc == got_acc and got_acc["prompts_consumed"] == 6 * 16


def test_a_run_to_a_storage_uri_persists_there_and_resumes_after_a_kill(micro_teacher, tmp_path, capsys,
                                                                        reference_run):
    """train.out_dir=file:///... (pyarrow.fs: the same code as s3:// or gs://): the run works in a staging
    directory and persists metrics, checkpoints, summary and final/ to the URI; SIGKILLed, `--resume` from the
    URI repeats the uninterrupted run's losses; a fresh run into it is refused."""
    from ar2dlm_ray.runs import RunStorage

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_dir, store = reference_run, tmp_path / "store" / "run"
    uri = f"file://{store}"
    staged = RunStorage(uri).local
    assert not staged.is_relative_to(tmp_path), "the staging directory is not the URI's location"
    # The live log is the staged one; the URI gets it before each checkpoint.
    _kill_after_step_3(_train_cmd(micro_teacher, uri), env, staged / "metrics.jsonl")
    persisted = [m["step"] for m in _metrics(store)]
    assert persisted in ([1, 2], [1, 2, 3, 4]), persisted
    latest = json.loads((store / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert latest == f"step_{persisted[-1]:07d}" and (store / "checkpoints" / latest / "trainer_state.pt").is_file()
    assert not (store / "summary.json").exists() and not (store / "final").exists()

    _train_here(_train_cmd(micro_teacher, uri, "--resume"))
    ref, got = _metrics(ref_dir), _metrics(store)
    assert [m["step"] for m in got] == list(range(1, 7))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)) < 1e-5
    summary = json.loads((store / "summary.json").read_text())
    assert summary["final_student"] == f"{uri}/final" and (store / "final" / "ar2dlm_student.json").is_file()
    assert summary["accounting"] == json.loads((ref_dir / "summary.json").read_text())["accounting"]
    assert sorted(p.name for p in (store / "checkpoints").glob("step_*")) == ["step_0000004", "step_0000006"]
    assert (store / "config.json").is_file() and list((store / "tensorboard").glob("events.*"))

    capsys.readouterr()
    assert _cli_train(micro_teacher, uri) == 2
    err = capsys.readouterr().err.strip()
    assert f"{uri} holds a previous run" in err and "\n" not in err, err


def _cli_train(teacher, out_dir, *flags, **extra):
    from ar2dlm_ray.cli import main

    settings = {"train.max_steps": 2, "train.checkpoint_every": 1, "data.num_prompts": 64, **extra}
    return main(["train", "--config", "configs/micro.yaml", *flags, *_overrides(teacher, out_dir, **settings)])


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fresh_run_never_replaces_a_previous_one(micro_teacher, tmp_path, capsys):
    assert _cli_train(micro_teacher, tmp_path, **{"train.max_steps": 3}) == 0
    before = _files(tmp_path)
    capsys.readouterr()
    assert _cli_train(micro_teacher, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ar2dlm: error:") and "\n" not in err, err
    assert str(tmp_path) in err and "--resume" in err and "--overwrite" in err
    assert _files(tmp_path) == before, "the refused run changed the previous one"

    assert _cli_train(micro_teacher, tmp_path, "--overwrite") == 0
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_resume_refuses_config_changes_and_falls_back_from_a_damaged_checkpoint(micro_teacher, tmp_path, capsys):
    assert _cli_train(micro_teacher, tmp_path) == 0
    capsys.readouterr()
    changed = {"train.max_steps": 3, "train.seed": 5, "model.block_size": 8}
    assert _cli_train(micro_teacher, tmp_path, "--resume", **changed) == 2
    err = capsys.readouterr().err.strip()
    assert "train.seed 0 -> 5" in err and "model.block_size 4 -> 8" in err and "max_steps" not in err, err
    assert "--allow-change model.block_size,train.seed" in err and "\n" not in err
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]

    # The newest checkpoint is damaged: the run continues from the one before, and says so.
    state = tmp_path / "checkpoints" / "step_0000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    flags = ("--resume", "--allow-change", "train.seed")
    assert _cli_train(micro_teacher, tmp_path, *flags, **{"train.max_steps": 3, "train.seed": 5}) == 0
    out = capsys.readouterr().out
    assert "step_0000002 has an unreadable trainer_state.pt" in out and "resuming from step_0000001 instead" in out
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]


def test_sigterm_checkpoints_and_resume_keeps_the_schedule(micro_teacher, tmp_path):
    """SIGTERM (what `ray job stop` sends) writes a checkpoint after the step in progress and stops with one
    line; the resumed run keeps checkpointing on multiples of checkpoint_every and ends where an uninterrupted
    run ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    def cmd(out, *extra):
        return _train_cmd(micro_teacher, out, *extra, steps=7, every=3, keep=10)

    _train_here(cmd(ref_dir))
    proc = subprocess.Popen(cmd(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # stop it during step 5 (after the step-3 checkpoint)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    stopped = len(_metrics(run_dir))
    assert proc.returncode == 2 and stopped in (4, 5), (proc.returncode, stopped, err)
    assert err.strip().splitlines()[-1].startswith(f"ar2dlm: error: stopped by SIGTERM after step {stopped}; "
                                                   "checkpoint "), err
    assert "--resume" in err.strip().splitlines()[-1]
    ckpts = run_dir / "checkpoints"
    assert {p.name for p in ckpts.glob("step_*")} == {"step_0000003", f"step_{stopped:07d}"}
    _train_here(cmd(run_dir, "--resume"))
    assert {p.name for p in ckpts.glob("step_*")} == {"step_0000003", f"step_{stopped:07d}", "step_0000006",
                                                       "step_0000007"}
    ref, got = _metrics(ref_dir), _metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, 8))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)) < 1e-5
