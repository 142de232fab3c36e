"""Rollout-length curriculum (OPDLM.md §7) and the learning-rate schedule."""

from __future__ import annotations

import math

from .config import CurriculumConfig


def generation_length(batch_index: int, cfg: CurriculumConfig, fallback: int) -> int:
    """L_s = min(L_max, L_min + floor(s / S_warm * (L_max - L_min))); `fallback` when disabled."""
    if not cfg.enabled:
        return fallback
    if cfg.warmup_steps == 0:
        return cfg.max_len
    return min(cfg.max_len, cfg.min_len + math.floor(batch_index / cfg.warmup_steps * (cfg.max_len - cfg.min_len)))


def lr_factor(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up, then cosine from lr to min_lr over the remaining steps (as a factor of lr)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr
