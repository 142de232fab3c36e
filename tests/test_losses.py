"""Divergences against independent float64 computations, and the vectorised loss against a per-block loop."""

import copy
import math

import pytest
import torch

from ar2dlm_ray.config import SamplerConfig
from ar2dlm_ray.losses import divergence, objective, pick, token_divergence
from ar2dlm_ray.masks import block_causal, with_padding
from ar2dlm_ray.sampler import sample
from ar2dlm_ray.states import Rollout, build_batch, rollouts_from_sample
from ar2dlm_ray.student import convert
from ar2dlm_ray.teacher import HFTeacher

from conftest import tiny_causal_lm


def _naive(p_logits, q_logits, kind, beta):
    """Loop over the vocabulary in float64: p = teacher, q = student."""
    out = []
    for pl, ql in zip(p_logits.double().tolist(), q_logits.double().tolist()):
        zp = math.log(sum(math.exp(v) for v in pl))
        zq = math.log(sum(math.exp(v) for v in ql))
        p = [math.exp(v - zp) for v in pl]
        q = [math.exp(v - zq) for v in ql]

        def kl(a, b):
            return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

        if kind == "forward_kl":
            out.append(kl(p, q))
        elif kind == "reverse_kl":
            out.append(kl(q, p))
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
            out.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.9)])
def test_divergences_match_float64_loops(kind, beta):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 37, generator=g) * 3
    student = torch.randn(6, 37, generator=g) * 3
    got = token_divergence(student, torch.log_softmax(teacher, -1), None, 37, kind, beta)
    torch.testing.assert_close(got.double(), _naive(teacher, student, kind, beta), atol=1e-5, rtol=1e-5)


def test_jsd_endpoints_are_the_two_kls():
    g = torch.Generator().manual_seed(1)
    t, s = torch.log_softmax(torch.randn(4, 11, generator=g), -1), torch.log_softmax(torch.randn(4, 11, generator=g), -1)
    torch.testing.assert_close(divergence(s, t, "jsd", 0.0), divergence(s, t, "forward_kl"))
    torch.testing.assert_close(divergence(s, t, "jsd", 1.0), divergence(s, t, "reverse_kl"))
    assert (divergence(s, t, "jsd", 0.5) > 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_with_tail_is_nonnegative_and_full_when_k_is_vocab(kind):
    g = torch.Generator().manual_seed(2)
    V = 50
    teacher = torch.log_softmax(torch.randn(64, V, generator=g) * 4, -1)
    student = torch.randn(64, V, generator=g) * 4
    for k in (1, 5, 16, 49):
        top = teacher.topk(k, -1)
        d = token_divergence(student, top.values, top.indices, V, kind, 0.5, tail=True)
        assert (d >= -1e-6).all(), (k, d.min())
    top = teacher.topk(V, -1)
    full = token_divergence(student, teacher, None, V, kind, 0.5)
    torch.testing.assert_close(token_divergence(student, top.values, top.indices, V, kind, 0.5, tail=True), full,
                               atol=1e-5, rtol=1e-5)


def test_topk_tail_bin_matches_independent_computation():
    g = torch.Generator().manual_seed(3)
    teacher = torch.log_softmax(torch.randn(3, 20, generator=g), -1)
    student = torch.randn(3, 20, generator=g)
    top = teacher.topk(4, -1)
    got = token_divergence(student, top.values, top.indices, 20, "forward_kl", tail=True).double()
    s = torch.log_softmax(student.double(), -1)
    for row in range(3):
        ids = top.indices[row].tolist()
        p = [teacher[row, i].double().exp().item() for i in ids]
        q = [s[row, i].exp().item() for i in ids]
        ref = sum(a * math.log(a / b) for a, b in zip(p, q))
        ref += (1 - sum(p)) * math.log((1 - sum(p)) / (1 - sum(q)))
        assert abs(got[row].item() - ref) < 1e-5


def _per_block_loss(student, rollouts, batch, targets, kind, hard):
    """Reference: one forward per (rollout, block) over [prompt, clean earlier blocks, noisy block]."""
    B, spec = student.spec.block_size, student.spec
    T = batch.input_ids.shape[1]
    # Recover P and L from the layout: positions of xt equal those of x0.
    for L in range(T // 2, 0, -1):
        if torch.equal(batch.positions[:, T - L:], batch.positions[:, T - 2 * L:T - L]) and (T - 2 * L) % B == 0:
            break
    P = T - 2 * L
    losses = []
    for row, r in enumerate(rollouts):
        n_p = len(r.prompt_ids)
        xt = batch.input_ids[row, P + L:P + L + len(r.tokens)]
        chosen = set((batch.pred_index[batch.rollout == row] % T).tolist())
        total, count = 0.0, 0
        for start in range(0, len(r.tokens), B):
            block_xt = xt[start:start + B]
            ids = torch.tensor(r.prompt_ids + r.tokens[:start] + block_xt.tolist())[None]
            n = ids.shape[1]
            # The prompt's blocks end where generation starts, so pad its front to a block boundary.
            pad = (-n_p) % B
            full = torch.cat([torch.zeros((1, pad), dtype=torch.long), ids], 1)
            valid = torch.cat([torch.zeros((1, pad), dtype=torch.bool), torch.ones((1, n), dtype=torch.bool)], 1)
            pos = torch.cat([torch.zeros((1, pad), dtype=torch.long), torch.arange(n)[None]], 1)
            logits, _ = student.forward(full, pos, with_padding(block_causal(full.shape[1], B), valid))
            for j in range(len(block_xt)):
                g = start + j
                col = (P + g - 1 if g % B == 0 else P + L + g - 1) if spec.shift else P + L + g
                if col not in chosen:
                    continue
                at = pad + n_p + g - (1 if spec.shift else 0)
                lg = logits[0, at][None]
                if hard:
                    w = batch.weights[(batch.rollout == row) & (batch.pred_index % T == col)]
                    total += w.item() * torch.nn.functional.cross_entropy(lg[:, :spec.teacher_vocab_size],
                                                                          torch.tensor([r.tokens[g]])).item()
                else:
                    tt = targets[row]
                    total += token_divergence(lg, tt.logprobs[g][None], None if tt.ids is None else tt.ids[g][None],
                                              spec.teacher_vocab_size, kind).item()
                count += 1
        denom = int(batch.denominators[row])
        if denom:
            losses.append(total / denom)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("states,hard,top_k", [("trajectory", False, None), ("random", False, 8), ("random", True, None)])
def test_vectorised_loss_equals_per_block_loop(family, shift, states, hard, top_k, tokenizer):
    # Gemma 3 with a window of 8: sequences of about 20 tokens, and xt sits far from x0 in the layout.
    teacher_model = tiny_causal_lm(family, len(tokenizer), seed=3, sliding_window=8)
    student = convert(copy.deepcopy(teacher_model), copy.deepcopy(tokenizer), block_size=4, shift=shift)
    prompts = [tokenizer.encode(t) for t in ["Once more unto the breach", "All the world's a stage", "Is this a dagger"]]
    out = sample(student, prompts, SamplerConfig(max_new_tokens=13, temperature=1.0, steps_per_block=3), seed=5,
                 eos_ids=[])
    rollouts = rollouts_from_sample(out)
    rollouts[1].tokens, rollouts[1].reveal_steps = rollouts[1].tokens[:6], rollouts[1].reveal_steps[:6]  # ragged
    teacher = HFTeacher(teacher_model, tokenizer, top_k=top_k)
    targets = None if hard else teacher.score([(r.prompt_ids, r.tokens) for r in rollouts])
    batch = build_batch(rollouts, student.spec, tokenizer.pad_token_id, states=states, targets=targets,
                        generator=torch.Generator().manual_seed(7))
    assert batch.stats["supervised"] > 0
    with torch.no_grad():
        # The lean path (LM head at supervised columns only, loss in chunks of 5) against the naive loop.
        got = objective(student.supervised_logits(batch), batch, student.spec.teacher_vocab_size,
                        chunk_tokens=5).item()
        ref = _per_block_loss(student, rollouts, batch, targets, "forward_kl", hard)
    assert abs(got - ref) < 1e-5 * max(1.0, abs(ref)), (got, ref)


def test_trajectory_states_are_states_the_sampler_visited():
    from ar2dlm_ray.states import trajectory_masks
    reveal = torch.tensor([[0, 2, 1, 2, 0, 0, 1, 3]])
    valid = torch.ones_like(reveal, dtype=torch.bool)
    seen = [set(), set()]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        m = trajectory_masks(reveal, valid, 4, g)[0]
        for blk in range(2):
            rev, msk = reveal[0, blk * 4:(blk + 1) * 4], m[blk * 4:(blk + 1) * 4]
            r = int(rev[msk].min())
            assert torch.equal(msk, rev >= r)  # exactly the state before step r
            seen[blk].add(r)
    assert seen == [{0, 1, 2}, {0, 1, 3}]


def test_eos_is_excluded_unless_asked(tokenizer):
    student = convert(tiny_causal_lm("llama", len(tokenizer)), copy.deepcopy(tokenizer), block_size=2)
    eos = tokenizer.eos_token_id
    r = Rollout([5, 6, 7], [10, 11, eos], [0, 0, 0])
    args = dict(states="trajectory", eos_ids=[eos], generator=torch.Generator().manual_seed(0))
    assert build_batch([r], student.spec, 0, **args).stats["supervised"] == 2
    assert build_batch([r], student.spec, 0, supervise_eos=True, **args).stats["supervised"] == 3


@pytest.mark.parametrize("reveal_row,states", [
    ([0, 1, -1, -1], {(True, True): 0.5, (False, True): 0.5}),  # a final block cut short by EOS
    ([-1, -1, 1, 0], {(True, True): 0.5, (True, False): 0.5}),  # padding first in the block
    ([0, 0, 0, -1], {(True, True, True): 1.0}),
])
def test_trajectory_states_follow_the_rule_in_a_partial_block(reveal_row, states):
    """r is uniform over the distinct reveal steps of the valid positions; padding takes no part."""
    from ar2dlm_ray.states import trajectory_masks
    reveal = torch.tensor([reveal_row] * 4000)
    valid = reveal >= 0
    m = trajectory_masks(reveal, valid, 4, torch.Generator().manual_seed(0))
    assert not (m & ~valid).any()
    drawn = [tuple(row[valid[0]].tolist()) for row in m]
    for state, share in states.items():
        assert abs(drawn.count(state) / len(drawn) - share) < 0.03, (state, drawn.count(state) / len(drawn))
    assert set(drawn) == set(states)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_tail_is_exact_when_the_student_tail_is_tiny(kind):
    """A student sure of the teacher's top-k (tail mass ~1e-9): float32 1 - sum(top-k) rounds to 0, the
    log-space tail does not. Loss and gradient against float64 autograd on the same formula."""
    g = torch.Generator().manual_seed(4)
    V, k = 200, 8
    teacher = torch.log_softmax(torch.randn(16, V, generator=g) * 3, -1)
    top = teacher.topk(k, -1)
    logits = torch.randn(16, V, generator=g)
    logits.scatter_(-1, top.indices, 30.0 + torch.randn(16, k, generator=g))  # tail ~ V * e^-30 ~ 1e-11..1e-9

    def loss(lg, dtype):
        lg = lg.to(dtype)
        s = torch.log_softmax(lg, -1)
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top.indices, True)
        s_tail = torch.logsumexp(s.masked_fill(keep, float("-inf")), -1, keepdim=True)
        t = top.values.double()
        t_tail = torch.log(1 - t.exp().sum(-1, keepdim=True))
        return divergence(torch.cat([s.gather(-1, top.indices), s_tail], -1),
                          torch.cat([t, t_tail], -1).to(dtype), kind).sum()

    ref_logits = logits.double().requires_grad_()
    ref = loss(ref_logits, torch.float64)
    ref.backward()
    got_logits = logits.clone().requires_grad_()
    got = token_divergence(got_logits, top.values, top.indices, V, kind, tail=True).sum()
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-4 * abs(ref.item()), (got.item(), ref.item())
    torch.testing.assert_close(got_logits.grad.double(), ref_logits.grad, atol=1e-5, rtol=1e-3)
