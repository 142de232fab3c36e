"""Divergences between teacher targets and student predictions (OPDLM.md §4, §6).

Everything works on "bins": log-probabilities over the same K outcomes for teacher and student. The full
vocabulary is K = V; a top-k teacher gives k bins plus, optionally, one tail bin holding the remaining
mass, so that the truncated divergence is still a divergence between two distributions.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

# Floor of a tail bin's log-mass (an empty tail, k = V): far below anything that moves the loss, and finite.
_LOG_FLOOR = -69.0  # log(1e-30)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis; bins where p is exactly zero contribute nothing."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def divergence(student_log: torch.Tensor, teacher_log: torch.Tensor, kind: str = "forward_kl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher and student bins.

    forward_kl = KL(teacher || student) (the default), reverse_kl = KL(student || teacher), jsd = GKD's
    generalised Jensen-Shannon: beta=0 is forward KL, beta=1 reverse KL, in between
    beta * KL(T || M) + (1 - beta) * KL(S || M) with M = beta * T + (1 - beta) * S.
    """
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(teacher_log, student_log)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_log, teacher_log)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}; use forward_kl, reverse_kl or jsd")
    mix = torch.logsumexp(torch.stack([teacher_log + torch.log(torch.tensor(beta)),
                                       student_log + torch.log(torch.tensor(1.0 - beta))]), dim=0)
    return beta * _kl(teacher_log, mix) + (1.0 - beta) * _kl(student_log, mix)


def _teacher_log_tail(teacher_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top-k))) from the teacher's k log-probs, in float64: 1 - sum rounds to 0 in float32
    once the tail is below about 1e-7."""
    lse = torch.logsumexp(teacher_logp.double(), -1, keepdim=True)
    return torch.log(-torch.expm1(lse.clamp_max(0.0))).clamp_min(_LOG_FLOOR).to(teacher_logp.dtype)


def _student_log_tail(student_logp: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """The student's tail mass as a log-sum-exp over the tokens outside the top-k: exact (and with an exact
    gradient) however small the tail, where 1 - sum(top-k) cancels to 0."""
    outside = student_logp.scatter(-1, teacher_ids, float("-inf"))
    return torch.logsumexp(outside, -1, keepdim=True).clamp_min(_LOG_FLOOR)


def topk_bins(student_logp: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
              tail: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher bins for a top-k teacher: the k teacher tokens, plus the tail when `tail`.

    `tail: true` makes the truncated divergence a divergence between two distributions; `tail: false` is
    the reference code's sparse KL over the k tokens alone (not renormalised)."""
    student_k = student_logp.gather(-1, teacher_ids)
    if not tail:
        return student_k, teacher_logp
    return (torch.cat([student_k, _student_log_tail(student_logp, teacher_ids)], -1),
            torch.cat([teacher_logp, _teacher_log_tail(teacher_logp)], -1))


def token_divergence(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor | None,
                     vocab: int, kind: str = "forward_kl", beta: float = 0.5, tail: bool = True) -> torch.Tensor:
    """Divergence per position from raw student logits [N, V_s] and teacher targets.

    `teacher_ids` is None for full-vocabulary targets [N, vocab]; the student's logits are cut to the
    teacher's `vocab` (an added mask row is not part of it) before normalising.
    """
    student_logp = torch.log_softmax(student_logits[..., :vocab].float(), dim=-1)
    if teacher_ids is None:
        return divergence(student_logp, teacher_logp.float(), kind, beta)
    s_bins, t_bins = topk_bins(student_logp, teacher_ids, teacher_logp.float(), tail)
    return divergence(s_bins, t_bins, kind, beta)


def hard_label_nll(student_logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Cross-entropy of the true tokens, per position."""
    return torch.nn.functional.cross_entropy(student_logits[..., :vocab].float(), targets, reduction="none")


def per_rollout_mean(values: torch.Tensor, rollout: torch.Tensor, n_rollouts: int,
                     denominators: torch.Tensor) -> torch.Tensor:
    """Sum values per rollout, divide by that rollout's denominator, average over rollouts that have one."""
    sums = torch.zeros(n_rollouts, dtype=values.dtype, device=values.device).index_add_(0, rollout, values)
    has = denominators > 0
    if not has.any():
        return values.sum() * 0.0
    return (sums[has] / denominators[has].to(values.dtype)).mean()


def objective(picked: torch.Tensor, batch, vocab: int, kind: str = "forward_kl", beta: float = 0.5,
              tail: bool = True, chunk_tokens: int = 0) -> torch.Tensor:
    """The training loss of a TrainBatch from the student's logits at its supervised positions ([N, V],
    `Student.supervised_logits`; `pick` takes them from full logits).

    Distillation batches: mean divergence over each rollout's supervised (masked) positions, then mean
    over rollouts (weight 1). Hard-label batches: sum of (1/t)-weighted cross-entropy over the masked
    positions divided by the rollout's supervised length, then mean over rollouts (the block-diffusion
    NELBO per token).

    `chunk_tokens`: positions are taken that many at a time, each chunk recomputed in the backward pass,
    so that no float32 [positions, vocab] tensor (the upcast, log-softmax, the tail's scatter) is larger
    than a chunk. Every position's loss is computed alone, so chunking changes no number.
    """
    if batch.teacher_logp is not None:
        def per_token(lo: int, hi: int) -> torch.Tensor:
            ids = None if batch.teacher_ids is None else batch.teacher_ids[lo:hi]
            return token_divergence(picked[lo:hi], batch.teacher_logp[lo:hi], ids, vocab, kind, beta, tail)
    else:
        def per_token(lo: int, hi: int) -> torch.Tensor:
            return hard_label_nll(picked[lo:hi], batch.targets[lo:hi], vocab) * batch.weights[lo:hi]
    values = _in_chunks(per_token, picked.shape[0], chunk_tokens, picked.requires_grad and torch.is_grad_enabled())
    return per_rollout_mean(values, batch.rollout, batch.input_ids.shape[0], batch.denominators)


def _in_chunks(per_token, n: int, chunk: int, recompute: bool) -> torch.Tensor:
    if not chunk or n <= chunk:
        return per_token(0, n)
    parts = []
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        # Non-reentrant checkpointing keeps only the chunk's inputs; its float32 temporaries are rebuilt in
        # the backward pass one chunk at a time.
        parts.append(torch.utils.checkpoint.checkpoint(per_token, lo, hi, use_reentrant=False) if recompute
                     else per_token(lo, hi))
    return torch.cat(parts)


def pick(logits: torch.Tensor, batch) -> torch.Tensor:
    """The supervised positions' rows of full logits [b, P + 2L, V]: what `Student.supervised_logits` computes
    without the rest."""
    return logits.reshape(-1, logits.shape[-1])[batch.pred_index]
