"""The block-diffusion sampler (OPDLM.md §3) on a converted, really pretrained micro teacher (and, for
sliding windows, a tiny random Gemma 3)."""

import copy

import pytest
import torch

from ar2dlm_ray.config import SamplerConfig
from ar2dlm_ray.sampler import sample, step_quota
from ar2dlm_ray.student import convert, load_causal_lm

from conftest import tiny_causal_lm


@pytest.fixture(scope="module", params=[False, True], ids=["noshift", "shift"])
def student(request, micro_teacher):
    model, tok = load_causal_lm(micro_teacher)
    return convert(model, tok, block_size=4, shift=request.param)


def _prompts(student):
    tok = student.tokenizer
    texts = ["12+34=", "ROMEO:\nBut soft, what light", "The capital of", "First Citizen:\nBefore we proceed any further"]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("remasking,temperature,threshold", [("static", 0.0, 0.9), ("static", 1.0, 0.9),
                                                             ("dynamic", 0.0, 0.5), ("dynamic", 1.0, 0.3)])
def test_cached_sampler_equals_full_recomputation(student, remasking, temperature, threshold):
    cached = _assert_cached_equals_recomputed(student, _prompts(student), max_new_tokens=22, remasking=remasking,
                                              threshold=threshold, temperature=temperature)
    assert cached.gen_lens.max() > 4  # more than one block was decoded


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("remasking,temperature", [("static", 0.0), ("dynamic", 1.0)])
def test_cached_sampler_equals_full_recomputation_beyond_a_sliding_window(shift, remasking, temperature, tokenizer):
    window = 8
    student = convert(tiny_causal_lm("gemma3", len(tokenizer), sliding_window=window), copy.deepcopy(tokenizer),
                      block_size=4, shift=shift)
    prompts = [tokenizer.encode(t) for t in ["O Romeo, Romeo!", "Now is the winter of our discontent", "Is this"]]
    cached = _assert_cached_equals_recomputed(student, prompts, max_new_tokens=30, remasking=remasking,
                                              threshold=0.01, temperature=temperature, eos_ids=[])
    assert cached.sequences.shape[1] > 4 * window


def _assert_cached_equals_recomputed(student, prompts, eos_ids=None, **cfg):
    """Sample with and without the cache; the trajectories must be identical. Returns the cached output."""
    assert len({len(p) for p in prompts}) == len(prompts)
    cached, full = (sample(student, prompts, SamplerConfig(steps_per_block=4, use_cache=use_cache, **cfg), seed=11,
                           eos_ids=eos_ids) for use_cache in (True, False))
    assert torch.equal(cached.sequences, full.sequences)
    assert torch.equal(cached.reveal_steps, full.reveal_steps)
    assert torch.equal(cached.gen_lens, full.gen_lens) and torch.equal(cached.forwards, full.forwards)
    return cached


def test_static_commits_the_quota_each_step(student):
    cfg = SamplerConfig(max_new_tokens=16, steps_per_block=3, remasking="static", temperature=1.0)
    out = sample(student, _prompts(student), cfg, seed=0, eos_ids=[])
    quota = step_quota(4, 3)
    assert quota == [2, 1, 1]
    for row in range(len(out.prompt_ids)):
        rev = out.reveal_steps[row].view(-1, 4)
        for block in rev:
            assert [int((block == s).sum()) for s in range(3)] == quota
    assert int(out.forwards[0]) == 4 * 3  # 4 blocks x 3 steps


def test_dynamic_decodes_several_tokens_per_forward_when_confident(student):
    low = SamplerConfig(max_new_tokens=24, remasking="dynamic", threshold=0.05, temperature=0.0)
    high = low.model_copy(update={"threshold": 0.999})
    fast = sample(student, _prompts(student), low, seed=0, eos_ids=[])
    slow = sample(student, _prompts(student), high, seed=0, eos_ids=[])
    assert fast.tokens_per_forward() > slow.tokens_per_forward() >= 1.0
    # Reveal steps: at every step at least one token is committed, so step indices are contiguous.
    for row in range(fast.reveal_steps.shape[0]):
        for block in fast.reveal_steps[row].view(-1, 4):
            assert sorted(set(block.tolist())) == list(range(int(block.max()) + 1))


def test_generation_stops_after_the_block_with_eos(student):
    tok = student.tokenizer
    comma = tok.encode(",", add_special_tokens=False)[0]
    cfg = SamplerConfig(max_new_tokens=40, temperature=1.0)
    out = sample(student, _prompts(student), cfg, seed=3, eos_ids=[comma])
    width = out.prompt_width
    stopped = 0
    for row in range(len(out.prompt_ids)):
        n = int(out.gen_lens[row])
        toks = out.tokens(row)
        assert comma not in toks[:-1]
        if n < 40:
            stopped += 1
            assert toks[-1] == comma
        assert (out.sequences[row, width + n:] == tok.pad_token_id).all()
        assert (out.reveal_steps[row, n:] == -1).all() and (out.reveal_steps[row, :n] >= 0).all()
        assert not out.key_valid[row, width + n:].any()
    # suppress_eos: no row may stop early or contain the end token.
    full = sample(student, _prompts(student), cfg.model_copy(update={"suppress_eos": True}), seed=3, eos_ids=[comma])
    assert (full.gen_lens == 40).all() and all(comma not in full.tokens(r) for r in range(len(full.prompt_ids)))
    assert stopped > 0


@pytest.mark.parametrize("remasking,threshold", [("static", 0.9), ("dynamic", 0.3)])
def test_a_block_ends_at_its_eos_once_everything_before_is_committed(student, remasking, threshold):
    """Greedy decoding with a frequent end token against decoding that ignores it: the same tokens and
    reveal steps up to the end, and the forwards are those the reference needed to commit everything up to
    and including its first end token (the positions after it in that block cost none)."""
    tok = student.tokenizer
    comma = tok.encode(",", add_special_tokens=False)[0]
    cfg = SamplerConfig(max_new_tokens=40, steps_per_block=4, remasking=remasking, threshold=threshold,
                        temperature=0.0)
    out = sample(student, _prompts(student), cfg, seed=0, eos_ids=[comma])
    ref = sample(student, _prompts(student), cfg, seed=0, eos_ids=[])
    saved = 0
    for row in range(len(out.prompt_ids)):
        n = int(out.gen_lens[row])
        assert out.tokens(row) == ref.tokens(row)[:n]
        assert out.reveals(row) == ref.reveals(row)[:n]
        steps = [max(ref.reveals(row)[lo:min(lo + 4, n)]) + 1 for lo in range(0, n, 4)]
        assert int(out.forwards[row]) == sum(steps)
        end_block = ref.reveals(row)[(n - 1) // 4 * 4:(n - 1) // 4 * 4 + 4]
        saved += max(end_block) + 1 - steps[-1]
    assert saved > 0  # some row ended its last block early


def test_seed_makes_sampling_reproducible(student):
    cfg = SamplerConfig(max_new_tokens=12, temperature=1.0)
    a, b = (sample(student, _prompts(student), cfg, seed=5) for _ in range(2))
    c = sample(student, _prompts(student), cfg, seed=6)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


def test_mask_token_is_never_generated(student):
    cfg = SamplerConfig(max_new_tokens=24, temperature=1.5)
    out = sample(student, _prompts(student), cfg, seed=1, eos_ids=[])
    assert not (out.sequences[:, out.prompt_width:] == student.spec.mask_id).any()


def test_top_k_one_ignores_the_seed(student):
    cfg = SamplerConfig(max_new_tokens=12, temperature=0.7, top_k=1)
    a, b = (sample(student, _prompts(student), cfg, seed=seed) for seed in (3, 9))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.reveal_steps, b.reveal_steps)
