import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ar2dlm_ray.config import DataConfig, PretrainConfig
from ar2dlm_ray.pretrain import greedy_generate, pretrain_teacher, teacher_accuracy, teacher_dir
from ar2dlm_ray.tasks import TaskExample, TaskSuite

TINY = dict(steps=60, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seq_len=64,
            batch_size=8, vocab_size=400, num_facts=10)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """The tiny recipe pretrained once on 2 threads: (its config, its directory, its log)."""
    pcfg = PretrainConfig(cache_dir=str(tmp_path_factory.mktemp("tiny") / "teachers"), threads=2, **TINY)
    logs: list[str] = []
    return pcfg, pretrain_teacher(pcfg, DataConfig(), log=logs.append), logs


def test_tiny_pretrain_writes_checkpoint_and_caches(tiny_teacher):
    pcfg, out, logs = tiny_teacher
    assert str(out.parent) == pcfg.cache_dir and any("step 60/60" in line for line in logs)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp dir left behind

    report = json.loads((out / "pretrain_report.json").read_text())
    assert set(report["accuracy"]) == {"arith", "facts", "overall"}
    assert report["config"]["steps"] == 60 and report["final_loss"] < 6.0  # below log(400) = 6.0

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    assert model.config.hidden_size == 64 and model.config.vocab_size == len(tok)
    # Digits are split one per token, so addition can work digit by digit.
    assert tok.convert_ids_to_tokens(tok("123+45=", add_special_tokens=False)["input_ids"]) == list("123+45=")

    # Cached: the second call returns the same directory without training.
    logs2 = []
    t0 = time.time()
    assert pretrain_teacher(pcfg, DataConfig(), log=logs2.append) == out
    assert time.time() - t0 < 1.0 and logs2 == []
    # A different recipe is a different teacher; the thread count is not part of the recipe.
    assert teacher_dir(pcfg.model_copy(update={"seed": 1}), DataConfig()) != out
    assert teacher_dir(pcfg, DataConfig(seed=5)) != out
    assert teacher_dir(pcfg.model_copy(update={"threads": 1}), DataConfig()) == out

    # Batched left-padded greedy generation agrees with one-at-a-time generation.
    examples = TaskSuite(10, 0).heldout_examples(12, 0) + [TaskExample("arith", "1+1=", "2")]
    prompts = [e.prompt for e in examples]
    assert greedy_generate(model, tok, prompts, 6, batch_size=13) == greedy_generate(model, tok, prompts, 6, batch_size=1)
    acc = teacher_accuracy(model, tok, examples, batch_size=13)
    assert set(acc) == {"arith", "facts", "overall"} and 0.0 <= acc["overall"] <= 1.0


def test_pretrain_is_reproducible_and_independent_of_threads(tmp_path, tiny_teacher):
    """The same config gives the same teacher, bit for bit, with 1 or 2 torch threads (a newcomer's run can be
    told apart from the README's by the weights digest alone). Across CPU kernel sets it need not: with
    ATEN_CPU_CAPABILITY=avx2 instead of AVX512 the weights differ after a few steps."""
    from safetensors.torch import load_file

    from ar2dlm_ray.pretrain import teacher_fingerprint, weights_digest

    one = pretrain_teacher(PretrainConfig(cache_dir=str(tmp_path / "threads1"), threads=1, **TINY), DataConfig(),
                           log=lambda *a: None)
    outs = [one, tiny_teacher[1]]
    assert outs[0].name == outs[1].name  # the thread count is not part of the cache key
    a, b = (load_file(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (outs[0] / "tokenizer.json").read_bytes() == (outs[1] / "tokenizer.json").read_bytes()

    reports = [json.loads((o / "pretrain_report.json").read_text()) for o in outs]
    assert [r["threads"] for r in reports] == [1, 2]
    assert reports[0]["accuracy"] == reports[1]["accuracy"] and reports[0]["final_loss"] == reports[1]["final_loss"]
    fps = [teacher_fingerprint(o) for o in outs]
    assert fps[0]["weights_sha256"] == fps[1]["weights_sha256"] == weights_digest(outs[0])
    assert fps[0]["tokenizer_sha256"] == fps[1]["tokenizer_sha256"]
    assert fps[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and fps[0]["torch"] == torch.__version__
    # A teacher cached before the digests were recorded gets them computed (this test's own copy is changed).
    del reports[0]["weights_sha256"], reports[0]["tokenizer_sha256"]
    (outs[0] / "pretrain_report.json").write_text(json.dumps(reports[0]))
    assert teacher_fingerprint(outs[0])["weights_sha256"] == fps[1]["weights_sha256"]


def test_the_tests_teacher_is_what_its_recipe_made():
    """tests/assets/test_teacher (conftest's micro_teacher) is the teacher that conftest's TEST_TEACHER recipe names
    (a change to the recipe or to the pretraining code changes the key: pretrain it again and ship that), with
    the weights and tokenizer its report records."""
    from conftest import TEST_TEACHER, TEST_TEACHER_DIR

    from ar2dlm_ray.pretrain import file_digest, teacher_key, weights_digest

    report = json.loads((TEST_TEACHER_DIR / "pretrain_report.json").read_text())
    assert report["key"] == teacher_key(PretrainConfig(**TEST_TEACHER), DataConfig())
    assert weights_digest(TEST_TEACHER_DIR) == report["weights_sha256"]
    assert file_digest(TEST_TEACHER_DIR / "tokenizer.json") == report["tokenizer_sha256"]


def test_the_shipped_teacher_is_the_recorded_one(tmp_path, monkeypatch):
    """The micro teacher shipped in the package: every file as its manifest records, weights digest ef4e3b6cba62
    (what the default recipe pretrains on an AMD EPYC with AVX512 kernels), and the default micro config runs with
    it."""
    import hashlib
    import shutil

    import pytest

    from ar2dlm_ray import pretrain
    from ar2dlm_ray.checks import ConfigError
    from ar2dlm_ray.config import load_config
    from ar2dlm_ray.models import resolve_teacher_path
    from ar2dlm_ray.pretrain import MANIFEST, SHIPPED_TEACHER, shipped_teacher, weights_digest

    manifest = json.loads((SHIPPED_TEACHER / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in SHIPPED_TEACHER.iterdir()} - {MANIFEST}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((SHIPPED_TEACHER / name).read_bytes()).hexdigest() == digest, name
    report = json.loads((SHIPPED_TEACHER / "pretrain_report.json").read_text())
    assert manifest["weights_sha256"] == report["weights_sha256"] == weights_digest(SHIPPED_TEACHER) == "ef4e3b6cba62"

    cfg = load_config("configs/micro.yaml")
    assert resolve_teacher_path(cfg, log=lambda *a: None) == str(SHIPPED_TEACHER)  # no pretraining
    assert shipped_teacher(cfg.pretrain.model_copy(update={"seed": 1}), cfg.data) is None  # another recipe

    copy = tmp_path / "micro_teacher"
    shutil.copytree(SHIPPED_TEACHER, copy)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    monkeypatch.setattr(pretrain, "SHIPPED_TEACHER", copy)
    with pytest.raises(ConfigError, match="tokenizer_config.json differs from its manifest"):
        shipped_teacher(cfg.pretrain, cfg.data)
