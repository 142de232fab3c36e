"""The HF teacher backend: targets are the teacher's next-token distributions at the right positions."""

import pytest
import torch

from ar2dlm_ray.tasks import TaskSuite
from ar2dlm_ray.teacher import HFTeacher

from conftest import tiny_causal_lm


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_causal_lm("qwen3", len(tokenizer), seed=4)


def _batch(tokenizer):
    pairs = [("Fair is foul, and foul is fair:", " Hover through the fog"), ("Out,", " damned spot! out, I say!"),
             ("What's in a name? That which we call a rose", " by any other")]
    return [(tokenizer.encode(p), tokenizer.encode(g)) for p, g in pairs]


def test_full_targets_are_next_token_logprobs_of_each_unpadded_sequence(model, tokenizer):
    batch = _batch(tokenizer)
    targets = HFTeacher(model, tokenizer, top_k=None, batch_size=2).score(batch)
    for (prompt, gen), tt in zip(batch, targets):
        assert tt.ids is None and tt.logprobs.shape == (len(gen), len(tokenizer))
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen])).logits[0].double()
        for j in range(len(gen)):
            ref = torch.log_softmax(logits[len(prompt) + j - 1], -1)
            torch.testing.assert_close(tt.logprobs[j].double(), ref, atol=1e-5, rtol=1e-5)


def test_topk_targets_are_the_largest_full_logprobs(model, tokenizer):
    batch = _batch(tokenizer)
    full = HFTeacher(model, tokenizer).score(batch)
    top = HFTeacher(model, tokenizer, top_k=16).score(batch)
    for f, t in zip(full, top):
        assert t.ids.shape == (len(f), 16)
        torch.testing.assert_close(t.logprobs, f.logprobs.gather(-1, t.ids))
        assert (t.logprobs[:, -1:] >= f.logprobs.topk(16, -1).values[:, -1:] - 1e-6).all()


def test_topk_larger_than_vocab_is_an_error(model, tokenizer):
    with pytest.raises(ValueError, match="top_k"):
        HFTeacher(model, tokenizer, top_k=len(tokenizer) + 1)


def test_generate_stops_at_eos(micro_teacher):
    teacher = HFTeacher.load(micro_teacher, batch_size=4)
    tok = teacher.tokenizer
    fact = TaskSuite(20, 0).facts[0]  # the fixture's teacher memorised these facts
    prompts = [tok.encode(p, add_special_tokens=False) for p in ["12+30=", fact.prompt, "The capital of", "KING:"]]
    gens = teacher.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert len(gens) == 4
    for g in gens:
        assert 0 < len(g) <= 12
        assert tok.eos_token_id not in g[:-1]
    assert gens[1][-1] == tok.eos_token_id and tok.decode(gens[1][:-1]) == fact.answer
