"""Outputs never destroy input: every command that writes refuses, in one line and before any work, a target
that would replace the current directory, a source, someone else's files or an earlier result it was not told
to replace; and what was there is untouched afterwards."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ar2dlm_ray import cli
from ar2dlm_ray.checks import ConfigError
from ar2dlm_ray.outputs import MARKER, check_output_dir, check_output_file

MICRO_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "micro.yaml")


def _tree(path: Path) -> dict[str, str]:
    """Every file under `path` with its sha256: what 'untouched' means."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(capsys, *argv) -> str:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("ar2dlm: error: "), err
    return err


@pytest.fixture
def teacher_copy(micro_teacher, tmp_path):
    return Path(shutil.copytree(micro_teacher, tmp_path / "teacher"))


def test_convert_refuses_every_target_that_would_destroy_input(capsys, teacher_copy, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine too")
    monkeypatch.chdir(work / "sub")
    before = _tree(tmp_path)
    cases = {
        ".": "is the current directory or above it",
        "..": "is the current directory or above it",
        str(teacher_copy): "would replace --model",
        str(tmp_path): "is the current directory or above it",  # above the cwd and the model
        str(tmp_path / "foreign"): "holds files that ar2dlm did not write",
    }
    for out, reason in cases.items():
        for extra in ((), ("--overwrite",)):  # --overwrite never reaches past these
            assert reason in _refused(capsys, "convert", "--model", teacher_copy, "--out", out, *extra), out
    assert _tree(tmp_path) == before


def test_convert_writes_new_or_empty_dirs_and_replaces_its_own_only_when_told(capsys, teacher_copy, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "student", empty):
        assert cli.main(["convert", "--model", str(teacher_copy), "--out", str(out)]) == 0
        assert (out / MARKER).is_file() and (out / "ar2dlm_student.json").is_file()
    capsys.readouterr()
    written = _tree(empty)
    assert "pass --overwrite" in _refused(capsys, "convert", "--model", teacher_copy, "--out", empty)
    assert _tree(empty) == written
    (empty / "ar2dlm_student.json").write_text("{}")  # an edit that --overwrite is asked to replace
    assert cli.main(["convert", "--model", str(teacher_copy), "--out", str(empty), "--block-size", "2",
                     "--overwrite"]) == 0
    assert json.loads((empty / "ar2dlm_student.json").read_text())["block_size"] == 2
    assert not list(tmp_path.glob(".empty.*"))  # no temporary or set-aside copy left behind


def test_save_hf_dir_never_replaces_foreign_files(teacher_copy, tmp_path):
    from ar2dlm_ray.student import convert, load_causal_lm

    model, tokenizer = load_causal_lm(str(teacher_copy))
    student = convert(model, tokenizer, 4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="did not write"):
        student.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "teacher"]  # nothing half-written beside it


def test_result_files_are_checked_before_the_work(capsys, micro_teacher, tmp_path, monkeypatch):
    import ar2dlm_ray.bench

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark ran before its --out was checked")

    monkeypatch.setattr(ar2dlm_ray.bench, "bench_sampler", no_work)
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "old.json").write_text("{}")
    before = _tree(tmp_path)
    bench = ("bench", "sampler", "--config", MICRO_YAML, f"model.teacher={micro_teacher}")
    assert "is a directory" in _refused(capsys, *bench, "--out", tmp_path / "a_dir")
    assert "exists; pass --overwrite" in _refused(capsys, *bench, "--out", tmp_path / "old.json")
    evaluate = ("eval", "--model", micro_teacher, "--teacher", micro_teacher, "--config", MICRO_YAML)
    assert "is a directory" in _refused(capsys, *evaluate, "--out", tmp_path / "a_dir")
    assert "exists; pass --overwrite" in _refused(capsys, *evaluate, "--out", tmp_path / "old.json")
    assert "which this command reads" in _refused(capsys, *evaluate, "--out", Path(micro_teacher) / "config.json",
                                                "--overwrite")
    assert _tree(tmp_path) == before


def test_the_checks_themselves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / MARKER).write_text("{}")
    (tmp_path / "marked" / "x").write_text("x")
    assert check_output_dir("marked", overwrite=True) == tmp_path / "marked"
    with pytest.raises(ConfigError, match="pass --overwrite"):
        check_output_dir("marked")
    with pytest.raises(ConfigError, match="current directory"):
        check_output_dir(tmp_path.parent)
    assert check_output_file("new/deeper/r.json") == tmp_path / "new" / "deeper" / "r.json"
    with pytest.raises(ConfigError, match="would replace --model"):
        check_output_dir(tmp_path / "m", sources={"--model": str(tmp_path / "m" / "inner")})


def test_an_experiment_never_writes_into_foreign_files(capsys, tmp_path):
    results = tmp_path / "results"
    (results / "smoke").mkdir(parents=True)
    (results / "smoke" / "thesis.tex").write_text("years of work")
    err = _refused(capsys, "experiment", "--config", Path(MICRO_YAML).parent / "experiments" / "micro_ablation_cpu.yaml",
                   "--results-dir", results, "--set", "name=smoke")
    assert "holds files that ar2dlm did not write" in err
    assert [p.name for p in (results / "smoke").iterdir()] == ["thesis.tex"]
