"""Rollout-length curriculum (OPDLM.md §7) and the learning-rate schedule."""

from __future__ import annotations

import math

from .config import CurriculumConfig


def generation_length(batch_index: int, cfg: CurriculumConfig, fallback: int) -> int:
    """L_s = L_min + floor(f(s / S_warm) * (L_max - L_min)), f capped at 1; `fallback` when disabled.

    `linear` (OPDLM.md §7): f(x) = x. `cosine` (the reference code's "cos" ramp, slow start):
    f(x) = 1 - cos(pi/2 * x), so the long rollouts come later than under the linear ramp."""
    if not cfg.enabled:
        return fallback
    if cfg.warmup_steps == 0:
        return cfg.max_len
    x = min(1.0, batch_index / cfg.warmup_steps)
    frac = x if cfg.schedule == "linear" else 1.0 - math.cos(math.pi / 2 * x)
    # The epsilon keeps exact products (0.29 * 100 = 28.999...) from flooring one short.
    return min(cfg.max_len, cfg.min_len + math.floor(frac * (cfg.max_len - cfg.min_len) + 1e-9))


def lr_factor(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up, then cosine from lr to min_lr over the remaining steps (as a factor of lr)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr
