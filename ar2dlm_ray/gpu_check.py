"""GPU check: sampler exactness in bf16, learner-step speed and memory, sampler vs autoregressive speed.

Runs on one CUDA GPU with only torch and transformers: the student is a random-initialised model of
Qwen3-0.6B's shape (nothing is downloaded) and every token is a random id. Writes one JSON file:

    python -m ar2dlm_ray.gpu_check --out gpu_check.json          # on the GPU machine
    python -m ar2dlm_ray.gpu_check --out check.json --tiny       # a 2-layer model on CPU, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types
from dataclasses import dataclass, field, replace

import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

from .losses import objective
from .sampler import _CachedContext, _RecomputeContext, layout_prompts, sample
from .states import Rollout, build_batch
from .student import Student, StudentSpec
from .teacher import TokenTargets

# Qwen3-0.6B's config.json, less what does not change the computation.
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True)
# Dense bf16 tensor-core peak by device-name substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TOP_K = 16
BLOCK = 4


@dataclass(frozen=True)
class Profile:
    model: dict
    mask_id: int  # an embedding row the tokenizer never emits
    prompt_len: int
    lengths: tuple[int, ...]
    agreement_len: int
    batch_size: int


PROFILES = {
    # 151669 is the first row after Qwen3's 151643 text tokens and 26 special tokens: a spare slot.
    "qwen3-0.6b": Profile(QWEN3_0_6B, mask_id=151669, prompt_len=128, lengths=(512, 2048), agreement_len=256,
                          batch_size=4),
    "tiny": Profile(TINY, mask_id=511, prompt_len=8, lengths=(16, 32), agreement_len=32, batch_size=2),
}


@dataclass
class SamplerSettings:
    """What `sample` reads from a SamplerConfig, without pydantic."""

    max_new_tokens: int = 64
    steps_per_block: int = 4
    remasking: str = "static"
    threshold: float = 0.9
    confidence: str = "prob"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    use_cache: bool = True
    suppress_eos: bool = False


@dataclass
class Check:
    student: Student
    profile: Profile
    dtype: torch.dtype
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def device(self) -> torch.device:
        return self.student.device

    def prompts(self, batch: int) -> list[list[int]]:
        ids = torch.randint(0, self.profile.mask_id, (batch, self.profile.prompt_len), generator=self.generator)
        return ids.tolist()


def build_student(profile: Profile, device: torch.device) -> Student:
    torch.manual_seed(0)
    cfg = Qwen3Config(**profile.model, attn_implementation="sdpa")
    with device:  # initialise on the device: a 0.6B model's CPU init alone takes tens of seconds
        model = Qwen3ForCausalLM(cfg)
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=None)  # all the sampler reads
    spec = StudentSpec(mask_id=profile.mask_id, mask_token="<|mask|>", block_size=BLOCK, shift=False,
                       teacher_vocab_size=cfg.vocab_size)
    return Student(model.eval(), tokenizer, spec)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _guarded(fn, *args):
    """Run a measurement; an out-of-memory is recorded as its result instead of ending the check."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}


def matmul_params(model) -> int:
    """Parameters that cost 2 FLOPs per token forward: all but the input embedding lookup, which is free;
    a tied LM head is a real matmul, so tied weights count once."""
    total = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if head is embed else total - embed.numel()


@torch.no_grad()
def max_logit_diff(check: Check, out) -> float:
    """Largest |cached - recomputed| logit over the first step of every block, both contexts fed the final
    tokens of `out`: the two paths on identical inputs, however far the trajectories drifted apart."""
    student, B = check.student, check.student.spec.block_size
    seq, positions, key_valid, width = layout_prompts(out.prompt_ids, B, out.gen_width, 0, check.device)
    cached = _CachedContext(student, seq, positions, key_valid, width)
    full = _RecomputeContext(student, seq.clone(), positions, key_valid, width)
    worst = 0.0
    for start in range(width, seq.shape[1], B):
        key_valid[:, start:start + B] = True
        masked = torch.full((seq.shape[0], B), student.spec.mask_id, device=check.device)
        diff = cached.block_logits(masked, start).float() - full.block_logits(masked, start).float()
        worst = max(worst, float(diff.abs().max()))
        final = out.sequences[:, start:start + B].to(check.device)
        cached.finish_block(final, start)
        full.finish_block(final, start)
    return worst


def sampler_agreement(check: Check) -> dict:
    n = check.profile.agreement_len
    prompts = check.prompts(check.profile.batch_size)
    outs = [sample(check.student, prompts, SamplerSettings(max_new_tokens=n, use_cache=use_cache), seed=1,
                   eos_ids=[]) for use_cache in (True, False)]
    cached, full = outs
    w = cached.prompt_width
    same_tokens = cached.sequences[:, w:] == full.sequences[:, w:]
    same_reveal = cached.reveal_steps == full.reveal_steps
    differs = (~(same_tokens & same_reveal)).any(0).nonzero()
    return {
        "dtype": str(check.dtype).removeprefix("torch."), "gen_len": n, "batch_size": len(prompts),
        "remasking": "static", "temperature": 1.0, "seed": 1,
        "identical": bool(same_tokens.all() and same_reveal.all()),
        "tokens_equal_fraction": float(same_tokens.float().mean()),
        "reveal_steps_equal_fraction": float(same_reveal.float().mean()),
        "first_difference": int(differs[0]) if len(differs) else None,
        "max_abs_logit_diff": max_logit_diff(check, cached),
    }


def synthetic_batch(check: Check, length: int):
    """Random rollouts with valid reveal steps (each block a permutation of 0..B-1, as static decoding with
    one token a step produces) and top-k teacher log-probs that leave mass in the tail."""
    gen, vocab = check.generator, check.profile.mask_id
    rollouts, targets = [], []
    for prompt in check.prompts(check.profile.batch_size):
        tokens = torch.randint(0, vocab, (length,), generator=gen).tolist()
        reveal = torch.cat([torch.randperm(BLOCK, generator=gen) for _ in range(length // BLOCK)]).tolist()
        rollouts.append(Rollout(prompt, tokens, reveal))
        logp = torch.log_softmax(torch.randn(length, TOP_K + 1, generator=gen), -1)[:, :TOP_K]
        # K distinct ids per position: a random start plus K evenly spaced offsets.
        ids = (torch.randint(0, vocab, (length, 1), generator=gen) + torch.arange(TOP_K) * (vocab // TOP_K)) % vocab
        targets.append(TokenTargets(logp, ids))
    start = time.perf_counter()
    batch = build_batch(rollouts, check.student.spec, 0, states="trajectory", targets=targets, generator=gen)
    return batch, time.perf_counter() - start


def learner_step(check: Check, batch, optimizer) -> float:
    model = check.student.model
    optimizer.zero_grad(set_to_none=True)
    # fp32 master weights and AdamW state; bf16 compute where the check runs in bf16.
    with torch.autocast(check.device.type, dtype=check.dtype, enabled=check.dtype != torch.float32):
        logits = check.student.supervised_logits(batch)
    loss = objective(logits, batch, check.student.spec.teacher_vocab_size, chunk_tokens=1024)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def _mfu(flops: int, seconds: float, peak_flops: float | None) -> float | None:
    return flops / seconds / peak_flops if peak_flops else None


def learner_figures(check: Check, length: int, peak_flops: float | None, steps: int = 2) -> dict:
    model = check.student.model
    cfg = model.config
    _reset_peak(check.device)
    batch, build_s = synthetic_batch(check, length)
    batch = batch.to(check.device)
    b, T = batch.input_ids.shape
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    try:
        learner_step(check, batch, optimizer)  # warm-up: kernels, allocator, AdamW state
        _sync(check.device)
        start = time.perf_counter()
        losses = [learner_step(check, batch, optimizer) for _ in range(steps)]
        _sync(check.device)
        step_s = (time.perf_counter() - start) / steps
    finally:
        # Free gradients and AdamW state now (also after an out-of-memory), not when they are collected.
        model.eval()
        model.zero_grad(set_to_none=True)
        optimizer.state.clear()
    dense = 6 * matmul_params(model) * b * T
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T * T * b
    return {
        "rollout_len": length, "prompt_len": check.profile.prompt_len, "batch_size": b, "positions": T,
        "supervised_tokens": batch.stats["supervised"], "build_s": build_s, "step_s": step_s,
        "tokens_per_s": b * length / step_s, "processed_tokens_per_s": b * T / step_s,
        "flops_per_step": dense, "attention_flops_per_step": attention,
        "mfu": _mfu(dense, step_s, peak_flops), "mfu_with_attention": _mfu(dense + attention, step_s, peak_flops),
        "peak_memory_gib": _peak_gib(check.device), "loss": losses[-1],
    }


def production_learner(profile: Profile, device: torch.device, dtype: torch.dtype, prompt_len: int,
                       rollout_len: int) -> dict:
    """One optimiser step of the learner the Ray runs use, at `prompt_len` + `rollout_len` with every generated
    position supervised (a training sequence of prompt + 2 x rollout): FSDP2 at world 1 (float32 shards as the
    master weights, `dtype` compute), activation checkpointing, the LM head at the supervised positions only and
    the loss in chunks. Its peak memory beside `ar2dlm plan`'s estimate for the same settings. Needs the
    package's dependencies (pydantic, for the run config): without them it is skipped."""
    try:
        from .config import RunConfig
        from .learner import Learner, shard
        from .plan import plan
    except ImportError as exc:
        return {"skipped": f"needs the package's dependencies: {exc}"}
    import torch.distributed as dist

    cfg = RunConfig.model_validate({
        "mode": "ray", "model": {"dtype": str(dtype).removeprefix("torch."), "block_size": BLOCK},
        "teacher": {"backend": "hf", "top_k": TOP_K}, "curriculum": {"enabled": False},
        "sampler": {"max_new_tokens": rollout_len}, "data": {"max_prompt_tokens": prompt_len},
        "train": {"rollout_batch_size": 1, "micro_batch_size": 1, "activation_checkpointing": True,
                  "lr": 1e-6, "min_lr": 1e-6, "warmup_steps": 0}})
    planned = plan(cfg, 0.0, {**profile.model, "model_type": "qwen3"})["roles"]["learner"]
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the check's own model
    # A group of one, its store in this process.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    try:
        student = build_student(profile, torch.device("cpu"))  # float32 on the CPU; shard() moves the shards
        shard(student, dtype, device.type)
        learner = Learner(student, cfg, total_steps=2)
        g = torch.Generator().manual_seed(0)
        rollout = Rollout(torch.randint(0, profile.mask_id, (prompt_len,), generator=g).tolist(),
                          torch.randint(0, profile.mask_id, (rollout_len,), generator=g).tolist(), [0] * rollout_len)
        top = torch.randn(rollout_len, TOP_K, generator=g).log_softmax(-1) - 0.1  # leaves a tail bin
        targets = TokenTargets(top, torch.randint(0, profile.mask_id, (rollout_len, TOP_K), generator=g))
        learner.train_step([rollout], [targets], 0)  # AdamW state exists from here on
        _reset_peak(device)
        start = time.perf_counter()
        out = learner.train_step([rollout], [targets], 1)
        _sync(device)
        step_s = time.perf_counter() - start
    finally:
        dist.destroy_process_group()
    peak = None if device.type != "cuda" else (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return {"prompt_len": prompt_len, "rollout_len": rollout_len, "positions": prompt_len + 2 * rollout_len,
            "supervised_tokens": out["supervised_tokens"], "loss": out["loss"], "step_s": step_s,
            "peak_memory_gib": peak, "planned_gib": planned["gb"], "planned_parts_gib": planned["parts"],
            "measured_over_planned": None if peak is None else peak / planned["gb"]}


def _timed(check: Check, fn) -> tuple[object, float]:
    _reset_peak(check.device)
    _sync(check.device)
    start = time.perf_counter()
    result = fn()
    _sync(check.device)
    return result, time.perf_counter() - start


def sampler_speed(check: Check, prompts, length: int, remasking: str) -> dict:
    cfg = SamplerSettings(max_new_tokens=length, remasking=remasking, threshold=0.9, steps_per_block=BLOCK)
    sample(check.student, prompts, SamplerSettings(max_new_tokens=2 * BLOCK), seed=0, eos_ids=[])  # warm-up
    out, seconds = _timed(check, lambda: sample(check.student, prompts, cfg, seed=2, eos_ids=[]))
    tokens = int(out.gen_lens.sum())
    return {"remasking": remasking, "threshold": cfg.threshold if remasking == "dynamic" else None,
            "steps_per_block": cfg.steps_per_block, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "model_calls": out.batch_forwards,
            "tokens_per_forward": out.tokens_per_forward(), "peak_memory_gib": _peak_gib(check.device)}


@torch.no_grad()
def generate_speed(check: Check, prompts, length: int) -> dict:
    ids = torch.tensor(prompts, device=check.device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  use_cache=True, pad_token_id=0)
    model = check.student.model
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    out, seconds = _timed(check, lambda: model.generate(ids, max_new_tokens=length, min_new_tokens=length,
                                                        **kwargs))
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_memory_gib": _peak_gib(check.device)}


def speed_figures(check: Check, length: int) -> dict:
    prompts = check.prompts(check.profile.batch_size)
    row = {"gen_len": length, "batch_size": len(prompts), "prompt_len": check.profile.prompt_len}
    for name, fn, args in (("static", sampler_speed, ("static",)), ("dynamic", sampler_speed, ("dynamic",)),
                           ("ar_generate", generate_speed, ())):
        row[name] = _guarded(fn, check, prompts, length, *args)
    for name in ("static", "dynamic"):
        ok = "tokens_per_s" in row[name] and "tokens_per_s" in row["ar_generate"]
        row[f"{name}_vs_ar"] = row[name]["tokens_per_s"] / row["ar_generate"]["tokens_per_s"] if ok else None
    return row


NOTES = [
    "Random-initialised weights of the real shape: speed and memory are the architecture's; losses and "
    "token choices mean nothing.",
    "Learner: each rollout is trained as [prompt | x0 | xt], P + 2L positions; tokens_per_s counts the L "
    "generated tokens per rollout, processed_tokens_per_s all P + 2L positions.",
    "step_s: forward, backward, gradient clipping and AdamW, mean over timed steps after one warm-up step; "
    "build_s (CPU, build_batch) is not in it.",
    "mfu = 6 * N * processed tokens per second / peak dense bf16 FLOPs, N = matmul parameters (input "
    "embedding lookup excluded, tied LM head counted once); attention score FLOPs are left out. "
    "mfu_with_attention adds 12 * layers * heads * head_dim * T^2 per sequence: the dense T x T attention "
    "that SDPA computes under an explicit mask.",
    "Sampler and generate both sample at temperature 1 without top-k/top-p and without EOS, so every "
    "sequence has exactly gen_len tokens; *_vs_ar > 1 means the diffusion sampler is faster.",
    "Static remasking with 4 steps per block of 4 commits one token per forward, as generate does: it can "
    "win only by cheaper forwards. Fewer steps per block, or dynamic remasking on a trained student, commit "
    "more than one.",
    "Dynamic remasking on a random model commits about one token per forward (no confidence reaches the "
    "threshold), so its tokens/s is a floor; a trained student commits more per forward.",
    "sampler_agreement: cached (KV cache) against recomputed rollouts, same seed; in bf16 the two paths may "
    "round differently, and one flipped choice changes the rest of its trajectory. max_abs_logit_diff "
    "compares the two paths' logits on identical inputs.",
]


def _write(report: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def _resolve_device(requested: str | None, tiny: bool) -> torch.device:
    if requested in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cpu" or (requested is None and tiny):
        return torch.device("cpu")
    raise SystemExit("gpu_check: no CUDA device visible; run it on a GPU machine, or pass --tiny for a CPU run")


def run(out: str, device: torch.device, tiny: bool, dtype: torch.dtype, batch_size: int | None = None,
        lengths: tuple[int, ...] | None = None) -> dict:
    profile = PROFILES["tiny" if tiny else "qwen3-0.6b"]
    profile = replace(profile, batch_size=batch_size or profile.batch_size,
                      lengths=tuple(lengths or profile.lengths))
    dtype_name = str(dtype).removeprefix("torch.")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    student = build_student(profile, device)
    check = Check(student, profile, dtype)
    report = {
        "device": {"name": name, "type": device.type, "peak_bf16_flops": peak, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "transformers": transformers.__version__},
        "model": {"profile": "tiny" if tiny else "qwen3-0.6b", "config": profile.model, "random_init": True,
                  "parameters": sum(p.numel() for p in student.model.parameters()),
                  "matmul_parameters": matmul_params(student.model), "mask_id": profile.mask_id,
                  "block_size": BLOCK},
        "settings": {"batch_size": profile.batch_size, "prompt_len": profile.prompt_len,
                     "lengths": list(profile.lengths), "dtype": dtype_name,
                     "learner_precision": f"float32 weights and AdamW state, {dtype_name} autocast"
                     if dtype != torch.float32 else "float32",
                     "sampler_precision": f"{dtype_name} weights", "teacher_top_k": TOP_K, "states": "trajectory"},
        "learner": [], "sampler_agreement": None, "sampling": [], "notes": NOTES,
    }
    # The learner runs first, on float32 master weights; the sampler and generate then use `dtype` weights.
    for length in profile.lengths:
        report["learner"].append({"rollout_len": length, **_guarded(learner_figures, check, length, peak)})
        print("learner", json.dumps(report["learner"][-1]), flush=True)
        _write(report, out)
    # The production learner at the paper's lengths (prompt 2048, rollout 4000) where it fits; --tiny: short.
    prompt_len, rollout_len = (profile.prompt_len, profile.lengths[-1]) if tiny else (2048, 4000)
    report["production_learner"] = _guarded(production_learner, profile, device, dtype, prompt_len, rollout_len)
    print("production_learner", json.dumps(report["production_learner"]), flush=True)
    _write(report, out)
    student.model.to(dtype)
    report["sampler_agreement"] = _guarded(sampler_agreement, check)
    print("sampler_agreement", json.dumps(report["sampler_agreement"]), flush=True)
    _write(report, out)
    for length in profile.lengths:
        report["sampling"].append(speed_figures(check, length))
        print("sampling", json.dumps(report["sampling"][-1]), flush=True)
        _write(report, out)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda (cpu with --tiny and no GPU)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer small-vocabulary model, short lengths")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="compute dtype; default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch-size", type=int, help="rollouts per batch (default 4; 2 with --tiny)")
    parser.add_argument("--lengths", type=int, nargs="+", help="rollout lengths (default 512 2048)")
    args = parser.parse_args(argv)
    if args.lengths and any(n % BLOCK for n in args.lengths):
        parser.error(f"--lengths must be multiples of the block size ({BLOCK})")
    device = _resolve_device(args.device, args.tiny)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    run(args.out, device, args.tiny, dtype, args.batch_size, args.lengths)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
