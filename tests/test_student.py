"""Conversion (OPDLM.md §2): block size 1 + shift reproduces the teacher; block-causal masking; save/load."""

import copy

import pytest
import torch

from ar2dlm_ray.config import SamplerConfig
from ar2dlm_ray.masks import block_causal, with_padding
from ar2dlm_ray.sampler import layout_prompts, sample
from ar2dlm_ray.student import NEW_MASK_TOKEN, choose_mask_token, convert, load_student

from conftest import tiny_causal_lm

FAMILIES = ["llama", "qwen3", "gpt2", "gemma3"]


def _prompts(tokenizer):
    texts = ["To be, or not to be, that is the question:", "O Romeo, Romeo!", "Now is the winter of our discontent"]
    return [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("family", FAMILIES)
def test_block_size_one_with_shift_gives_teacher_logits(family, tokenizer):
    teacher = tiny_causal_lm(family, len(tokenizer))
    student = convert(copy.deepcopy(teacher), copy.deepcopy(tokenizer), block_size=1, shift=True)
    prompts = _prompts(tokenizer)
    seq, pos, valid, width = layout_prompts(prompts, 1, 0, tokenizer.pad_token_id, "cpu")
    allowed = with_padding(block_causal(width, 1), valid)
    with torch.no_grad():
        logits, _ = student.forward(seq, pos, allowed)
        for row, ids in enumerate(prompts):
            ref = teacher(torch.tensor([ids])).logits[0]
            got = logits[row, width - len(ids):, : ref.shape[-1]]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_student_gives_teacher_logits_beyond_the_window(tokenizer):
    window = 8
    teacher = tiny_causal_lm("gemma3", len(tokenizer), sliding_window=window)
    student = convert(copy.deepcopy(teacher), copy.deepcopy(tokenizer), block_size=1, shift=True)
    texts = ["Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
             "Now is the winter of our discontent made glorious summer by this sun of York",
             "All the world's a stage, and all the men and women merely players"]
    prompts = [tokenizer.encode(t) for t in texts]
    assert min(len(p) for p in prompts) > 2 * window and len({len(p) for p in prompts}) == 3  # left-padded
    seq, pos, valid, width = layout_prompts(prompts, 1, 0, tokenizer.pad_token_id, "cpu")
    allowed = with_padding(block_causal(width, 1), valid)
    wide = tiny_causal_lm("gemma3", len(tokenizer), sliding_window=4 * width)  # same weights, window never hit
    with torch.no_grad():
        logits, _ = student.forward(seq, pos, allowed)
        for row, ids in enumerate(prompts):
            ref = teacher(torch.tensor([ids])).logits[0]  # HF's own sliding-window mask
            got = logits[row, width - len(ids):, : ref.shape[-1]]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            unwindowed = wide(torch.tensor([ids])).logits[0]
            assert torch.equal(unwindowed[:window], ref[:window])
            assert not torch.allclose(unwindowed[window:], ref[window:], atol=1e-3)  # the window matters


def test_sliding_window_leaves_no_query_without_keys(tokenizer):
    student = convert(tiny_causal_lm("gemma3", len(tokenizer), sliding_window=4), copy.deepcopy(tokenizer), 4)
    # One real block, then two blocks of padding after the rollout's end whose positions run on (as in
    # build_batch): the last padding queries are more than a window past every valid key.
    pos = torch.arange(12)[None]
    allowed = with_padding(block_causal(12, 4), pos < 4)
    masks = student.additive_mask(allowed, pos, pos)
    assert set(masks) == {"sliding_attention", "full_attention"}
    for mask in masks.values():
        assert (mask == 0).any(-1).all()
    assert torch.equal(masks["full_attention"] == 0, allowed)
    sees = (masks["sliding_attention"][0, 0] == 0).nonzero().tolist()
    assert [k for q, k in sees if q == 5] == [2, 3]  # valid keys fewer than 4 positions back
    assert [k for q, k in sees if q == 7] == list(range(12))  # none left: every key, like with_padding


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_sampling_with_block_size_one_reproduces_teacher_generate(family, tokenizer):
    # Gemma 3 with a window of 8: prompts plus 12 new tokens run past it (HF's generate keeps a sliding cache).
    teacher = tiny_causal_lm(family, len(tokenizer), seed=1, sliding_window=8)
    student = convert(copy.deepcopy(teacher), copy.deepcopy(tokenizer), block_size=1, shift=True)
    cfg = SamplerConfig(max_new_tokens=12, steps_per_block=1, temperature=0.0)
    for ids in _prompts(tokenizer):
        out = sample(student, [ids], cfg, seed=0, eos_ids=[])
        with torch.no_grad():
            ref = teacher.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert out.tokens(0) == ref
        assert out.reveals(0) == [0] * 12


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shift", [False, True])
def test_later_blocks_never_change_earlier_logits(family, shift, tokenizer):
    B = 4
    student = convert(tiny_causal_lm(family, len(tokenizer)), copy.deepcopy(tokenizer), block_size=B, shift=shift)
    ids = torch.tensor([tokenizer.encode("Friends, Romans, countrymen, lend me your ears; I come to bury")[:16]])
    assert ids.shape[1] == 16
    pos = torch.arange(16)[None]
    allowed = with_padding(block_causal(16, B), torch.ones_like(ids, dtype=torch.bool))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 7) % len(tokenizer)  # a token in block 2
    with torch.no_grad():
        a, _ = student.forward(ids, pos, allowed)
        b, _ = student.forward(changed, pos, allowed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=0, rtol=0)
    # ...while its own block sees it in both directions.
    assert not torch.allclose(a[:, 8], b[:, 8])


def test_mask_token_is_added_with_mean_embedding(tokenizer):
    model = tiny_causal_lm("llama", len(tokenizer))
    tok = copy.deepcopy(tokenizer)
    mean = model.get_input_embeddings().weight[: len(tok)].mean(0).detach().clone()
    student = convert(model, tok, block_size=4)
    assert student.spec.mask_token == NEW_MASK_TOKEN
    assert student.spec.mask_id == len(tokenizer) and student.spec.teacher_vocab_size == len(tokenizer)
    torch.testing.assert_close(model.get_input_embeddings().weight[student.spec.mask_id], mean)
    assert tok.decode([student.spec.mask_id]) == NEW_MASK_TOKEN


def test_reserved_token_is_reused_when_present(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_3|>", "<|reserved_special_token_0|>"]})
    token, idx = choose_mask_token(tok)
    assert token == "<|reserved_special_token_3|>" and idx == tok.convert_tokens_to_ids(token)
    model = tiny_causal_lm("llama", len(tok))
    width = model.get_input_embeddings().weight.shape[0]
    student = convert(model, tok, block_size=2)
    assert student.spec.mask_id == idx and model.get_input_embeddings().weight.shape[0] == width


def test_student_checkpoint_loads_back_bit_identical(tmp_path, tokenizer):
    student = convert(tiny_causal_lm("qwen3", len(tokenizer)), copy.deepcopy(tokenizer), block_size=4, shift=True)
    student.save(tmp_path / "student")
    again = load_student(tmp_path / "student")
    assert again.spec == student.spec
    mine, theirs = student.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    assert again.tokenizer.convert_tokens_to_ids(student.spec.mask_token) == student.spec.mask_id
    assert not list(tmp_path.glob(".student.*")), "temporary directory left behind"
