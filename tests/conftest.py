"""Shared fixtures: a real BPE tokenizer trained on Shakespeare, tiny random models of several HF
families, and a small micro teacher really pretrained on text (shipped in tests/assets, copied once a session)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def one_torch_thread():
    """torch on 1 thread for a while, as the actors and OMP_NUM_THREADS=1 subprocesses run: the same reductions,
    so their losses can be compared to 1e-5."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The tests on the shared local Ray run together after the others (one Ray serves them all: starting and
    stopping one costs seconds), and the vLLM tests last: a started vLLM CPU engine pins torch's thread count
    for the process."""
    items.sort(key=lambda item: ("vllm" in item.nodeid, "local_ray" in getattr(item, "fixturenames", ())))


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray for every test that asks for it, started once. Tests that need a cluster of their own
    (several nodes, a private head) run before these, and the vLLM tests after them stop it."""
    import ray

    if ray.is_initialized():  # an embedded Ray some earlier test left behind would fail ray.init
        ray.shutdown()
    # Ray's metrics agent drops a gauge two report intervals after its last report: with 2.5 s (its processes
    # read it from the environment, not from _system_config) a drained actor's series are gone in 5 s, not the
    # default 20 s that the resize test would wait for.
    os.environ["RAY_metrics_report_interval_ms"] = "2500"
    try:
        ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="ar2dlm-test", log_to_driver=False)
    finally:
        del os.environ["RAY_metrics_report_interval_ms"]
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    from ar2dlm_ray.data import shakespeare_texts
    from ar2dlm_ray.pretrain import train_tokenizer

    texts = shakespeare_texts()
    return train_tokenizer([t[:200_000] for t in texts[:4]], vocab_size=400)


def tiny_causal_lm(family: str, vocab_size: int, seed: int = 0, sliding_window: int = 512):
    """A randomly initialised model of a real HF architecture, small enough for unit tests.

    `sliding_window` applies to Gemma 3's sliding layers; a small one makes short sequences exceed it.
    """
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=sliding_window,
                                                   layer_types=["sliding_attention", "full_attention"]))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512))
    else:
        raise ValueError(family)
    return model.eval()


# The tests' teacher: what `pretrain_teacher(PretrainConfig(**TEST_TEACHER), DataConfig())` made on an AVX512 CPU
# (15 s on 2 cores; its weights depend on the CPU's kernels, and thresholds such as the on-policy KL test's were
# set on these), shipped in tests/assets/test_teacher. test_pretrain.py checks the files against its report.
TEST_TEACHER = dict(vocab_size=512, hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256, seq_len=64,
                    steps=250, batch_size=16, lr=3e-3, num_facts=20)
TEST_TEACHER_DIR = Path(__file__).parent / "assets" / "test_teacher"


@pytest.fixture(scope="session")
def micro_teacher(tmp_path_factory):
    """A small Llama teacher (4 attention heads of 24) pretrained for real on Shakespeare + tasks: a copy of the
    shipped one per session, so that nothing a test writes reaches the repository."""
    import json
    import shutil

    key = json.loads((TEST_TEACHER_DIR / "pretrain_report.json").read_text())["key"]  # as in a pretrain cache
    out = tmp_path_factory.mktemp("teacher") / key
    shutil.copytree(TEST_TEACHER_DIR, out)
    return str(out)
