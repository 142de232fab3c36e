"""Training states and the vectorised [prompt | x0 | xt] batch (OPDLM.md §5, §8).

A rollout is a prompt, its final tokens x0 and (for student rollouts) the step at which each token was
revealed. For every block we pick one noisy state:
- `trajectory`: a state the sampler actually visited (mask where reveal step >= r, r drawn uniformly
  from the block's distinct reveal steps);
- `random`: t ~ U(t_min, 1) per block, each position masked with probability t (weight 1/t for the
  hard-label baselines).
All blocks of a rollout are trained in one forward over [prompt | x0 | xt]; xt reuses x0's positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .masks import bd3lm_training, with_padding
from .student import StudentSpec
from .teacher import TokenTargets


@dataclass
class Rollout:
    """One trajectory: what flows from the samplers to the learner."""

    prompt_ids: list[int]
    tokens: list[int]
    reveal_steps: list[int] | None = None  # None for text that was not produced by the student's sampler
    version: int = 0  # weight version that produced it
    seed: int | None = None
    prompt_index: int = -1


def rollouts_from_sample(out, version: int = 0, prompt_indices: list[int] | None = None) -> list[Rollout]:
    indices = prompt_indices or [-1] * len(out.prompt_ids)
    return [
        Rollout(out.prompt_ids[r], out.tokens(r), out.reveals(r), version, out.seed, indices[r])
        for r in range(len(out.prompt_ids))
    ]


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [b, P + 2L]
    positions: torch.Tensor  # [b, P + 2L]
    allowed: torch.Tensor  # [b, 1, P + 2L, P + 2L]
    pred_index: torch.Tensor  # [N] flat index into [b * (P + 2L)] of the logit that predicts each supervised token
    rollout: torch.Tensor  # [N] which rollout a supervised token belongs to
    targets: torch.Tensor  # [N] the clean token x0
    weights: torch.Tensor  # [N] 1 (distillation) or 1/t (hard-label baselines)
    denominators: torch.Tensor  # [b] per-rollout normaliser of the loss
    teacher_logp: torch.Tensor | None = None  # [N, K]
    teacher_ids: torch.Tensor | None = None  # [N, K] or None for the full vocabulary
    stats: dict = field(default_factory=dict)

    def to(self, device) -> "TrainBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return TrainBatch(**moved)


def trajectory_masks(reveal: torch.Tensor, valid: torch.Tensor, block_size: int, generator: torch.Generator):
    """[b, L] masks of on-policy states: per block, mask positions with reveal step >= r."""
    b, L = reveal.shape
    nb = L // block_size
    rev = reveal.view(b, nb, block_size)
    ok = valid.view(b, nb, block_size)
    max_step = int(reveal.max().clamp_min(0)) + 1
    # Padding goes to an extra slot that is dropped: scattered onto slot 0, it could overwrite a real step 0
    # (scatter_ keeps whichever write comes last) and the fully masked state would never be drawn.
    slot = torch.where(ok, rev, torch.full_like(rev, max_step))
    present = torch.zeros((b, nb, max_step + 1), dtype=torch.bool).scatter_(-1, slot, True)[..., :max_step]
    # Uniform choice among the steps present in each block: the argmax of random scores over them.
    scores = torch.rand((b, nb, max_step), generator=generator).masked_fill(~present, -1.0)
    r = scores.argmax(-1, keepdim=True)
    return ((rev >= r) & ok).view(b, L)


def random_masks(valid: torch.Tensor, block_size: int, generator: torch.Generator, t_min: float = 1e-3):
    """[b, L] masks with t ~ U(t_min, 1) per block, and the per-position t."""
    b, L = valid.shape
    nb = L // block_size
    t = t_min + (1 - t_min) * torch.rand((b, nb, 1), generator=generator)
    t = t.expand(b, nb, block_size).reshape(b, L)
    masked = (torch.rand((b, L), generator=generator) < t) & valid
    return masked, t


def build_batch(rollouts: list[Rollout], spec: StudentSpec, pad_id: int, *, states: str, eos_ids=(),
                supervise_eos: bool = False, targets: list[TokenTargets] | None = None,
                generator: torch.Generator | None = None, t_min: float = 1e-3) -> TrainBatch:
    """Lay out rollouts as [prompt | x0 | xt] and choose the supervised positions.

    `states`: "trajectory" (needs reveal steps) or "random". With `targets` (teacher log-probs for every
    generated token) the batch is for distillation (weight 1, normalised by the number of supervised
    positions); without, it is hard-label (weight 1/t, normalised by the rollout's supervised length).
    """
    if states not in ("trajectory", "random"):
        raise ValueError(f"states must be 'trajectory' or 'random', got {states!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    B = spec.block_size
    b = len(rollouts)
    P = math.ceil(max(len(r.prompt_ids) for r in rollouts) / B) * B
    L = max(1, math.ceil(max(len(r.tokens) for r in rollouts) / B)) * B
    T = P + 2 * L
    x0 = torch.full((b, L), pad_id, dtype=torch.long)
    reveal = torch.full((b, L), -1, dtype=torch.long)
    valid = torch.zeros((b, L), dtype=torch.bool)
    input_ids = torch.full((b, T), pad_id, dtype=torch.long)
    positions = torch.zeros((b, T), dtype=torch.long)
    key_valid = torch.zeros((b, T), dtype=torch.bool)
    for row, r in enumerate(rollouts):
        n_p, n = len(r.prompt_ids), len(r.tokens)
        if n_p == 0:
            raise ValueError("a rollout needs a non-empty prompt")
        input_ids[row, P - n_p:P] = torch.tensor(r.prompt_ids)
        positions[row, P - n_p:P] = torch.arange(n_p)
        key_valid[row, P - n_p:P] = True
        x0[row, :n] = torch.tensor(r.tokens, dtype=torch.long)
        valid[row, :n] = True
        if states == "trajectory":
            if r.reveal_steps is None or len(r.reveal_steps) != n:
                raise ValueError("trajectory states need the sampler's reveal steps for every token")
            reveal[row, :n] = torch.tensor(r.reveal_steps, dtype=torch.long)
        gen_pos = torch.arange(n_p, n_p + L)
        positions[row, P:P + L] = gen_pos
        positions[row, P + L:] = gen_pos
    if states == "trajectory":
        masked = trajectory_masks(reveal, valid, B, generator)
        t = torch.ones((b, L))
    else:
        masked, t = random_masks(valid, B, generator, t_min)
    xt = torch.where(masked, torch.full_like(x0, spec.mask_id), x0)
    input_ids[:, P:P + L] = x0
    input_ids[:, P + L:] = xt
    key_valid[:, P:P + L] = valid
    key_valid[:, P + L:] = valid
    allowed = with_padding(bd3lm_training(P, L, B), key_valid)

    supervised = valid if supervise_eos or not len(eos_ids) else valid & ~torch.isin(x0, torch.tensor(list(eos_ids)))
    chosen = masked & supervised
    rows, cols = chosen.nonzero(as_tuple=True)
    if spec.shift:
        # The first token of a block is predicted by the last clean position before it; the others by
        # the noisy position before them, inside the same block.
        col_in_t = torch.where(cols % B == 0, P + cols - 1, P + L + cols - 1)
    else:
        col_in_t = P + L + cols
    distill = targets is not None
    denominators = chosen.sum(-1) if distill else supervised.sum(-1)
    batch = TrainBatch(
        input_ids=input_ids, positions=positions, allowed=allowed, pred_index=rows * T + col_in_t,
        rollout=rows, targets=x0[rows, cols], weights=torch.ones(len(rows)) if distill else 1.0 / t[rows, cols],
        denominators=denominators,
        stats={"rollouts": b, "tokens": int(valid.sum()), "supervised": int(chosen.sum())},
    )
    if distill:
        if len(targets) != b:
            raise ValueError(f"got teacher targets for {len(targets)} rollouts, expected {b}")
        for row, (r, tt) in enumerate(zip(rollouts, targets)):
            if len(tt) != len(r.tokens):
                raise ValueError(f"rollout {row}: {len(tt)} teacher targets for {len(r.tokens)} tokens")
        # `rows` comes out of nonzero() sorted, so per-row slices concatenate in the same order.
        batch.teacher_logp = torch.cat([targets[i].logprobs[cols[rows == i]] for i in range(b)])
        if targets[0].ids is not None:
            batch.teacher_ids = torch.cat([targets[i].ids[cols[rows == i]] for i in range(b)])
    return batch
