"""The learner on its own: minibatches against a plain loop of optimiser steps, the schedule counted in
optimiser steps, and float32 master weights under a bf16 model."""

import copy

import pytest
import torch

from ar2dlm_ray.config import ConfigError, RunConfig, load_config
from ar2dlm_ray.curriculum import lr_factor
from ar2dlm_ray.learner import Learner, minibatches
from ar2dlm_ray.losses import objective, pick
from ar2dlm_ray.states import Rollout, build_batch
from ar2dlm_ray.student import convert
from ar2dlm_ray.teacher import TokenTargets

from conftest import tiny_causal_lm


def _data(vocab: int, n: int, seed: int = 0):
    """Rollouts whose tokens were all revealed at step 0, so each block has one state (fully masked) and the
    loss does not depend on how the random state draws are split; full-vocabulary teacher targets."""
    g = torch.Generator().manual_seed(seed)
    rollouts, targets = [], []
    for i in range(n):
        length = 6 + i % 3
        tokens = torch.randint(10, vocab, (length,), generator=g).tolist()
        rollouts.append(Rollout(torch.randint(10, vocab, (5,), generator=g).tolist(), tokens, [0] * length))
        targets.append(TokenTargets(torch.log_softmax(torch.randn(length, vocab, generator=g) * 2, -1), None))
    return rollouts, targets


def _cfg(**train) -> RunConfig:
    return RunConfig.model_validate({"train": {"recipe": "opdlm", "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 0,
                                               "grad_clip": 0.5, **train}})


def test_minibatches_partition_in_order():
    assert [list(r) for r in minibatches(8, 4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    short = minibatches(5, 4)  # the end of an epoch: still 4 optimiser steps, every rollout once
    assert len(short) == 4 and sorted(i for r in short for i in r) == list(range(5))


def test_minibatch_steps_equal_a_plain_loop_of_optimiser_steps(tokenizer):
    base = convert(tiny_causal_lm("llama", len(tokenizer), seed=1), copy.deepcopy(tokenizer), block_size=2)
    rollouts, targets = _data(base.spec.teacher_vocab_size, 8)
    # 2 passes x 4 minibatches of 2 rollouts, each accumulated over micro-batches of 1.
    cfg = _cfg(rollout_batch_size=8, minibatch_size=2, micro_batch_size=1, updates_per_batch=2)
    student = copy.deepcopy(base)
    out = Learner(student, cfg, total_steps=1).train_step(rollouts, targets, step=0)
    assert out["optimizer_steps"] == 8 and len(out["updates"]) == 8

    ref = copy.deepcopy(base)
    params = list(ref.model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ref.model.train()
    losses = []
    for _ in range(2):
        for lo in range(0, 8, 2):
            opt.zero_grad()
            batch = build_batch(rollouts[lo:lo + 2], ref.spec, tokenizer.pad_token_id, states="trajectory",
                                targets=targets[lo:lo + 2])
            # The learner's own lean forward: what is compared here is the optimiser steps' bookkeeping (the lean
            # path against every position's logits: test_the_lean_path_gives_the_full_paths_loss_and_gradients).
            loss = objective(ref.supervised_logits(batch), batch, ref.spec.teacher_vocab_size)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            losses.append(loss.item())
    for got, want in zip(out["updates"], losses):
        assert abs(got["loss"] - want) < 1e-5, (got["loss"], want)
    for a, b in zip(student.model.parameters(), ref.model.parameters()):
        # Accumulation order, and the LM head over other column sets (micro-batches of 1 against 2): rounding that
        # AdamW turns into up to ~1 % of a step on near-zero gradients; a wrong step moves ~1e-3.
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_schedule_counts_optimiser_steps(tokenizer):
    student = convert(tiny_causal_lm("llama", len(tokenizer)), copy.deepcopy(tokenizer), block_size=2)
    rollouts, targets = _data(student.spec.teacher_vocab_size, 4)
    cfg = _cfg(rollout_batch_size=4, minibatch_size=1, lr=1e-3, min_lr=1e-4, warmup_steps=3)
    learner = Learner(student, cfg, total_steps=3)  # 3 training steps x 4 minibatches = 12 optimiser steps
    lrs = [u["lr"] for step in range(3) for u in learner.train_step(rollouts, targets, step)["updates"]]
    assert lrs == pytest.approx([1e-3 * lr_factor(s, 12, 3, 1e-3, 1e-4) for s in range(12)])
    assert lrs[-1] < lrs[3]


def test_minibatch_size_must_divide_the_rollout_batch():
    with pytest.raises(ConfigError, match=r"minibatch_size \(48\) must divide rollout_batch_size \(128\)"):
        load_config(None, ["train.minibatch_size=48"])
    with pytest.raises(ConfigError, match="minibatch_size"):
        load_config(None, ["train.rollout_batch_size=4", "train.minibatch_size=8"])


def _drift_run(tokenizer, dtype, steps=10, **train):
    """`steps` optimiser steps at lr 1e-5 from the same (bf16-representable) start; returns start and end."""
    model = tiny_causal_lm("llama", len(tokenizer), seed=2).to(torch.bfloat16).to(dtype)
    student = convert(model, copy.deepcopy(tokenizer), block_size=2)
    start = [p.detach().float().clone() for p in student.model.parameters()]
    rollouts, targets = _data(student.spec.teacher_vocab_size, 4, seed=5)
    cfg = _cfg(rollout_batch_size=4, lr=1e-5, min_lr=1e-5, grad_clip=1.0, **train)
    learner = Learner(student, cfg, total_steps=steps)
    for step in range(steps):
        learner.train_step(rollouts, targets, step)
    return start, [p.detach().float() for p in student.model.parameters()], learner


def test_bf16_model_follows_float32_training_through_master_weights(tokenizer):
    """At lr 1e-5 most AdamW updates are below bf16's resolution: updating bf16 weights directly loses
    them, float32 master weights keep them, and the bf16 model is the master rounded."""
    start, ref, _ = _drift_run(tokenizer, torch.float32)
    _, mixed, learner = _drift_run(tokenizer, torch.bfloat16)
    _, pure, _ = _drift_run(tokenizer, torch.bfloat16, master_weights=False)

    def changed(ws):
        return sum(int((w != s).sum()) for w, s in zip(ws, start)) / sum(s.numel() for s in start)

    def error(ws):  # distance from the float32 run, relative to how far the float32 run moved
        return (sum(float((w - r).abs().sum()) for w, r in zip(ws, ref))
                / sum(float((r - s).abs().sum()) for r, s in zip(ref, start)))

    master = learner.state_dict()["master_weights"]
    assert changed(ref) > 0.7  # rows of tokens that never occur get no gradient
    assert changed(master) > 0.7 and error(master) < 0.1, (changed(master), error(master))
    for m, p in zip(master, mixed):
        assert torch.equal(m.to(torch.bfloat16).float(), p)
    assert error(mixed) < 0.5 * error(pure), (error(mixed), error(pure))
    assert changed(pure) < 0.5 * changed(ref), changed(pure)


def test_master_weights_survive_a_checkpoint(tokenizer):
    _, _, learner = _drift_run(tokenizer, torch.bfloat16, steps=3)
    state = learner.state_dict()
    _, _, fresh = _drift_run(tokenizer, torch.bfloat16, steps=0)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.state_dict()["master_weights"], state["master_weights"]):
        assert torch.equal(a, b)
    for m, p in zip(state["master_weights"], fresh.student.model.parameters()):
        assert torch.equal(m.to(torch.bfloat16), p)


@pytest.mark.parametrize("family, shift, top_k", [("llama", False, None), ("llama", True, 5), ("gpt2", False, 5),
                                                  ("qwen3", True, None)])
def test_the_lean_path_gives_the_full_paths_loss_and_gradients(tokenizer, family, shift, top_k):
    """LM head only at supervised columns, the loss in chunks recomputed in the backward pass, and activation
    checkpointing, against every position's logits and one loss (float32). gpt2 ties its head to the embedding,
    llama and qwen3 do not."""
    base = convert(tiny_causal_lm(family, len(tokenizer), seed=2), copy.deepcopy(tokenizer), block_size=2,
                   shift=shift)
    assert (base.model.get_output_embeddings().weight is base.model.get_input_embeddings().weight) == (family == "gpt2")
    vocab = base.spec.teacher_vocab_size
    rollouts, targets = _data(vocab, 3)
    if top_k:
        targets = [TokenTargets(*t.logprobs.topk(top_k, -1)) for t in targets]
    batch = build_batch(rollouts, base.spec, tokenizer.pad_token_id, states="random", targets=targets,
                        generator=torch.Generator().manual_seed(3))
    assert batch.stats["supervised"] > 6  # more than two chunks of 3

    def loss_and_grads(student, lean: bool):
        student.model.train()
        student.model.zero_grad()
        torch.manual_seed(0)  # gpt2 has dropout in train mode: the same masks for both paths
        if lean:
            student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            loss = objective(student.supervised_logits(batch), batch, vocab, chunk_tokens=3)
        else:
            logits, _ = student.forward(batch.input_ids, batch.positions, batch.allowed)
            loss = objective(pick(logits, batch), batch, vocab)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None}

    full_loss, full_grads = loss_and_grads(copy.deepcopy(base), lean=False)
    lean_loss, lean_grads = loss_and_grads(copy.deepcopy(base), lean=True)
    assert abs(lean_loss - full_loss) <= 1e-6 * max(1.0, abs(full_loss)), (lean_loss, full_loss)
    assert lean_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_gradient_outlives_its_optimiser_step(tokenizer):
    """With bf16 weights and float32 masters, the masters' float32 gradients (4 bytes a parameter) used to stay
    alive into the next forward and backward."""
    student = convert(tiny_causal_lm("llama", len(tokenizer), seed=1).to(torch.bfloat16), copy.deepcopy(tokenizer),
                      block_size=2)
    rollouts, targets = _data(student.spec.teacher_vocab_size, 4)
    learner = Learner(student, _cfg(rollout_batch_size=4, minibatch_size=2, activation_checkpointing=True),
                      total_steps=1)
    out = learner.train_step(rollouts, targets, step=0)
    assert out["optimizer_steps"] == 2 and out["grad_norm"] > 0 and learner.master
    assert all(m.grad is None for m in learner.master) and all(p.grad is None for p in learner.params)
