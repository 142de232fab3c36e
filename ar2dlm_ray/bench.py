"""Rerunnable benchmarks. Timings on a noisy shared machine are only meaningful as ratios measured
side by side, so every benchmark interleaves its variants in one run and reports medians and ratios."""

from __future__ import annotations

import statistics
import time

import torch

from .config import SamplerConfig
from .sampler import sample
from .student import Student


def bench_sampler(student: Student, prompts: list[list[int]], cfg: SamplerConfig, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Cached sampler against full recomputation, interleaved; also checks that they agree."""
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    outputs = {}
    for _ in range(repeats):
        for name, use_cache in (("cached", True), ("recompute", False)):
            run_cfg = cfg.model_copy(update={"use_cache": use_cache})
            start = time.perf_counter()
            outputs[name] = sample(student, prompts, run_cfg, seed=seed)
            times[name].append(time.perf_counter() - start)
    cached, full = outputs["cached"], outputs["recompute"]
    tokens = int(cached.gen_lens.sum())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": len(prompts), "max_new_tokens": cfg.max_new_tokens, "block_size": student.spec.block_size,
        "remasking": cfg.remasking, "generated_tokens": tokens, "tokens_per_forward": cached.tokens_per_forward(),
        "cached_s": med["cached"], "recompute_s": med["recompute"],
        "cached_tokens_per_s": tokens / med["cached"], "recompute_tokens_per_s": tokens / med["recompute"],
        "speedup": med["recompute"] / med["cached"],
        "identical": bool(torch.equal(cached.sequences, full.sequences)
                          and torch.equal(cached.reveal_steps, full.reveal_steps)),
        "repeats": repeats, "threads": torch.get_num_threads(),
    }
