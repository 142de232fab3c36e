"""The memory plan: what each role (learner rank, rollout worker, vLLM teacher) needs on one GPU, from the
model's config.json alone, before anything is allocated.

Every figure is a sum of named parts, each a tensor (or set of tensors) of the real code path with its
shape and dtype; `ar2dlm bench memory` (memory.py) checks the learner's and the rollout worker's against
an exact fake-tensor measurement of that path. Worst case throughout: the longest prompt
(`data.max_prompt_tokens`), the longest rollout (`curriculum.max_len`, or `sampler.max_new_tokens` without a
curriculum) and every generated position supervised. GB here are GiB (2^30 bytes), as torch counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from .checks import ConfigError, model_config
from .config import RunConfig

GIB = 2**30
MODELS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def shipped_config(model_id: str) -> Path | None:
    """configs/models/<name>/config.json for a hub id such as Qwen/Qwen3-8B (the name after the owner)."""
    path = MODELS_DIR / model_id.rstrip("/").split("/")[-1] / "config.json"
    return path if model_id.count("/") == 1 and path.is_file() else None


def load_model_config(model: str) -> dict:
    """The config.json of a local model directory, or the shipped copy for a hub id (works offline)."""
    info = model_config(model)
    if info:
        return info
    shipped = shipped_config(model)
    if shipped is None:
        known = ", ".join(sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()))
        raise ConfigError(f"no config.json for model {model!r}: give a local model directory, or a hub id of a "
                          f"model shipped in configs/models ({known})")
    return json.loads(shipped.read_text())


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder (Qwen3 adds per-head RMSNorms on q and k)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, info: dict) -> "ModelShape":
        heads = info["num_attention_heads"]
        return cls(hidden=info["hidden_size"], intermediate=info["intermediate_size"],
                   layers=info["num_hidden_layers"], heads=heads,
                   kv_heads=info.get("num_key_value_heads") or heads,
                   head_dim=info.get("head_dim") or info["hidden_size"] // heads, vocab=info["vocab_size"],
                   tied=bool(info.get("tie_word_embeddings", False)), qk_norm=info.get("model_type") == "qwen3")

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        H = self.hidden
        attention = 2 * H * self.q_width + 2 * H * self.kv_width + (2 * self.head_dim if self.qk_norm else 0)
        return attention + 3 * H * self.intermediate + 2 * H

    @property
    def root_params(self) -> int:
        """Embeddings, LM head (when not tied) and the final norm: the FSDP root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.root_params + self.layers * self.layer_params


@dataclass(frozen=True)
class LearnerSettings:
    """What a learner rank's memory depends on (from a RunConfig, or varied to find one that fits)."""

    strategy: str
    workers: int
    rows: int  # train.micro_batch_size
    accumulates: bool  # a minibatch of several micro-batches: gradients stay resident through the next one
    prompt: int
    gen: int
    checkpointing: bool
    chunk: int  # train.loss_chunk_tokens
    dtype_bytes: int
    master: bool  # float32 master weights beside a low-precision model (replicate)
    targets: int  # teacher bins per position (top-k, or the vocabulary)

    @classmethod
    def from_config(cls, cfg: RunConfig, vocab: int) -> "LearnerSettings":
        t = cfg.train
        prompt, gen = worst_case_lengths(cfg)
        dtype_bytes = _BYTES[cfg.model.dtype]
        strategy = learner_strategy(cfg)
        return cls(strategy=strategy, workers=cfg.learner.num_workers if strategy == "fsdp" else 1,
                   rows=t.micro_batch_size, accumulates=(t.minibatch_size or t.rollout_batch_size) > t.micro_batch_size,
                   prompt=prompt, gen=gen, checkpointing=t.activation_checkpointing, chunk=t.loss_chunk_tokens,
                   dtype_bytes=dtype_bytes, master=t.master_weights and dtype_bytes < 4,
                   targets=cfg.teacher.top_k or vocab)


def learner_strategy(cfg: RunConfig) -> str:
    """How a learner rank holds the model: Ray learner groups shard it with FSDP2 at every group size
    ("fsdp"); the local trainer keeps one full replica with float32 masters ("replicate")."""
    return "fsdp" if cfg.mode == "ray" else "replicate"


def worst_case_lengths(cfg: RunConfig) -> tuple[int, int]:
    """(prompt, generated) tokens of the longest rollout a run trains on, in whole blocks."""
    B = cfg.model.block_size
    prompt = cfg.data.max_prompt_tokens or cfg.data.prompt_tokens
    gen = cfg.curriculum.max_len if cfg.curriculum.enabled else cfg.sampler.max_new_tokens
    return math.ceil(prompt / B) * B, math.ceil(gen / B) * B


def layer_activation_bytes(shape: ModelShape, wb: int) -> int:
    """Bytes a decoder layer saves for its backward pass, per token (counted from the tensors autograd keeps
    for a Qwen3/Llama layer in `wb`-byte compute)."""
    H = shape.hidden
    # RMSNorm keeps its float32 input, the 1/rms and the normalised input; the projections after it keep
    # its output: twice a layer (attention and MLP).
    norms = 2 * (4 * H + 4 + 2 * wb * H)
    # Qwen3's per-head q/k RMSNorms: float32 input, 1/rms and normalised copy per head.
    qk_norms = ((4 + wb) * (shape.q_width + shape.kv_width) + 4 * (shape.heads + shape.kv_heads)
                if shape.qk_norm else 0)
    # SDPA with an explicit mask: rotated q, keys and values repeated to every query head, the output (also
    # o_proj's input), and the float32 log-sum-exp per head.
    attention = 4 * wb * shape.q_width + 4 * shape.heads
    # SwiGLU: gate and up projections, the activation and the product (down_proj's input).
    mlp = 4 * wb * shape.intermediate
    return norms + qk_norms + attention + mlp


def learner_parts(shape: ModelShape, s: LearnerSettings) -> dict[str, int]:
    """Bytes per learner rank at its peak, by part. The peak is the backward pass of the loss (every layer's
    activations still held) or, with activation checkpointing, possibly a layer's recomputation; the
    optimiser step's transients are compared and the larger phase is kept."""
    P, H, V, wb = shape.params, shape.hidden, shape.vocab, s.dtype_bytes
    W = s.workers if s.strategy == "fsdp" else 1
    rows, T, L = s.rows, s.prompt + 2 * s.gen, s.gen
    tokens, N = rows * T, rows * L
    parts: dict[str, int] = {}
    if s.strategy == "fsdp":
        # FSDP2: float32 parameter shards are the master weights; gradients are reduce-scattered in float32.
        parts["param shards (fp32)"] = 4 * P // W
        parts["grad shards (fp32)"] = 4 * P // W
        parts["adamw moments"] = 8 * P // W
        # All-gathered for compute: the root (embeddings, head, final norm) and two layers (current and
        # prefetched); one layer's unsharded gradient (and its float32 copy) before its reduce-scatter.
        parts["unsharded root + 2 layers"] = wb * (shape.root_params + 2 * shape.layer_params)
        parts["unsharded layer grads"] = (wb + 4) * shape.layer_params
        step = {"adamw foreach temp": 4 * P // W}
        grads = {}
    else:
        stepped = 4 if s.master else wb
        parts["weights"] = wb * P
        if s.master:
            parts["master weights (fp32)"] = 4 * P
        parts["adamw moments"] = 2 * stepped * P
        grads = {"grads": wb * P} if s.accumulates else {}
        # The optimiser step: the float32 master gradients (the model's are freed as they are converted)
        # and foreach AdamW's sqrt(v) temporary.
        step = {("master grads (fp32)" if s.master else "grads"): stepped * P, "adamw foreach temp": stepped * P}
    acts: dict[str, int] = {}
    per_layer = layer_activation_bytes(shape, wb) * tokens
    if s.checkpointing:
        acts["layer inputs (checkpointed)"] = shape.layers * wb * H * tokens
    else:
        acts["layer activations"] = shape.layers * per_layer
    acts["attention masks"] = rows * T * T * (wb + 1)  # the additive mask and the boolean one it came from
    acts["final norm + rotary"] = tokens * (4 * H + 4 + wb * H + 2 * wb * shape.head_dim) + N * H * wb
    head = {"supervised logits": wb * N * V}
    if 0 < s.chunk < N:
        # Backward of the chunked loss: the logits' gradient accumulated chunk by chunk (running sum, the
        # chunk's full-size slice gradient and their sum), or two of them beside a chunk's float32 temporaries.
        head["logits grad accumulation"] = max(3 * wb * N * V, 2 * wb * N * V + 3 * 4 * s.chunk * V)
    else:
        head["float32 loss temporaries"] = 18 * N * V  # log-softmax, tail scatter and their gradients
    backward = {**grads, **acts, **head}
    if s.checkpointing:
        # Backward through a checkpointed layer: its activations recomputed, beside the inputs of all, and
        # the MLP's backward temporaries (gradients of its [T, intermediate] product and gate).
        recompute = {**grads, **acts, "recomputed layer": per_layer + 2 * wb * shape.intermediate * tokens}
        backward = max(backward, recompute, key=lambda p: sum(p.values()))
    if sum(step.values()) > sum(backward.values()):
        return {**parts, **step}
    return {**parts, **backward}


def rollout_phases(shape: ModelShape, rows: int, prompt: int, gen: int, block: int, wb: int) -> dict[str, dict[str, int]]:
    """Bytes of a rollout worker's two peaks, by part: the prefill of a batch of the longest prompts, and the
    last block's step (the KV cache at its longest). No gradients; the prefill's LM head runs at the last
    position only."""
    P, H, V = shape.params, shape.hidden, shape.vocab
    kv_token = shape.layers * 2 * shape.kv_width * wb  # one token's keys and values in every layer
    full = prompt + gen
    # Inside one layer, without autograd: the residual, RMSNorm's float32 copy and output, and the larger
    # of SDPA's inputs (q, keys and values repeated to every head) and output, and the MLP's three
    # [T, intermediate] tensors (activation, up projection, product).
    layer = (2 * wb + 4) * H + max(4 * wb * shape.q_width, 3 * wb * shape.intermediate)
    prefill = {"weights": wb * P, "kv cache": rows * prompt * kv_token,
               "attention masks": rows * prompt * prompt * (wb + 1),  # the additive mask and the boolean one
               "layer transients": rows * prompt * layer, "last logits": rows * V * 4}
    step = {"weights": wb * P, "kv cache": rows * full * kv_token,
            # SDPA with a mask takes keys and values repeated to every query head (one layer at a time).
            "repeated keys/values": rows * full * 2 * shape.q_width * wb,
            "block logits": rows * (block + 1) * V * wb}
    return {"prefill": prefill, "block step": step}


def rollout_parts(shape: ModelShape, cfg: RunConfig) -> dict[str, int]:
    prompt, gen = worst_case_lengths(cfg)
    phases = rollout_phases(shape, cfg.sampler.batch_size, prompt, gen, cfg.model.block_size,
                            _BYTES[cfg.model.dtype])
    return max(phases.values(), key=lambda p: sum(p.values()))


def teacher_parts(shape: ModelShape, cfg: RunConfig, gpu_memory_gb: float) -> dict[str, int]:
    """vLLM reserves `teacher.gpu_memory_utilization` of the GPU (weights, KV cache, its profiled activations).
    Beside it, scoring with `prompt_logprobs` builds a [n, vocab] logits tensor and its float32 log-softmax per
    request, which the profiling run does not count; `teacher.batch_size` requests are scored together."""
    prompt, gen = worst_case_lengths(cfg)
    n = prompt + gen
    requests = cfg.teacher.batch_size
    wb = _BYTES[cfg.teacher.dtype] if cfg.teacher.dtype in _BYTES else 2
    return {"vllm reservation": int(cfg.teacher.gpu_memory_utilization * gpu_memory_gb * GIB),
            "prompt logits": requests * n * shape.vocab * wb,
            "prompt log-softmax (fp32)": requests * n * shape.vocab * 4}


def plan(cfg: RunConfig, gpu_memory_gb: float = 80.0, model_info: dict | None = None) -> dict:
    """{"fits": bool, "roles": {role: {"gb", "fits", "parts": {name: GB}}}} for the learner rank, the
    rollout worker and (vLLM backend) the teacher."""
    shape = ModelShape.from_config(model_info or load_model_config(cfg.model.student or cfg.model.teacher))
    roles = {"learner": learner_parts(shape, LearnerSettings.from_config(cfg, shape.vocab)),
             "rollout": rollout_parts(shape, cfg)}
    if cfg.teacher.backend == "vllm":
        roles["teacher"] = teacher_parts(shape, cfg, gpu_memory_gb)
    out = {role: _role(parts, gpu_memory_gb) for role, parts in roles.items()}
    return {"fits": all(r["fits"] for r in out.values()), "gpu_memory_gb": gpu_memory_gb, "params": shape.params,
            "roles": out}


def _role(parts: dict[str, int], gpu_memory_gb: float) -> dict:
    total = sum(parts.values()) / GIB
    return {"gb": round(total, 2), "fits": total <= gpu_memory_gb,
            "parts": {name: round(b / GIB, 2) for name, b in sorted(parts.items(), key=lambda kv: -kv[1]) if b}}


def format_plan(result: dict) -> str:
    gpu = result["gpu_memory_gb"]
    lines = [f"{'role':<9} {'GB':>8}  fits {gpu:g} GB  biggest parts (GB)"]
    for role, r in result["roles"].items():
        biggest = ", ".join(f"{name} {gb:.1f}" for name, gb in list(r["parts"].items())[:4])
        lines.append(f"{role:<9} {r['gb']:>8.1f}  {'yes' if r['fits'] else 'NO':<{len(f'fits {gpu:g} GB')}}  {biggest}")
    lines.append(f"fits: {'yes' if result['fits'] else 'no'} ({result['params'] / 1e9:.2f}B parameters)")
    return "\n".join(lines)


def preflight(cfg: RunConfig, gpu_memory_gb: float, roles: tuple[str, ...] = ("learner", "rollout", "teacher")) -> None:
    """Refuse, in one line, a run whose plan does not fit GPUs of `gpu_memory_gb` (for `roles`, those on GPUs):
    the role, what it needs, what the GPU has, and settings that would make it fit."""
    info = load_model_config(cfg.model.student or cfg.model.teacher)
    result = plan(cfg, gpu_memory_gb, info)
    short = [(role, r) for role, r in result["roles"].items() if not r["fits"] and role in roles]
    if not short:
        return
    role, r = short[0]
    biggest = ", ".join(f"{name} {gb:.1f}" for name, gb in list(r["parts"].items())[:3])
    fix = _FIXES[role](ModelShape.from_config(info), cfg, gpu_memory_gb)
    also = "".join(f"; the {other} does not fit either ({o['gb']:.1f} GB)" for other, o in short[1:])
    raise ConfigError(f"the {role} needs {r['gb']:.1f} GB per GPU ({biggest} GB), the GPU has {gpu_memory_gb:g} GB: "
                      f"{fix}{also} (ar2dlm plan shows every part)")


def _gen_key(cfg: RunConfig) -> str:
    return "curriculum.max_len" if cfg.curriculum.enabled else "sampler.max_new_tokens"


def _learner_fix(shape: ModelShape, cfg: RunConfig, gpu_memory_gb: float) -> str:
    """The fitting learner settings with the fewest changes (rollout length last: it changes the experiment)."""
    s = LearnerSettings.from_config(cfg, shape.vocab)
    # More ranks shard the model further; a local (replicate) run would become a Ray run with a learner group.
    ranks = [(s.strategy, s.workers)] + [("fsdp", w) for w in (2, 4, 8, 16) if s.strategy != "fsdp" or w > s.workers]
    rows = [s.rows >> i for i in range(s.rows.bit_length())]
    options = []
    for gen in (s.gen, s.gen // 2, s.gen // 4):
        for ckpt in sorted({s.checkpointing, True}):
            for strategy, workers in ranks:
                for r in rows:
                    v = replace(s, checkpointing=ckpt, strategy=strategy, workers=workers, rows=r, gen=gen)
                    changes = {"train.activation_checkpointing": "true" if ckpt != s.checkpointing else None,
                               "mode": "ray" if strategy != s.strategy else None,
                               "learner.num_workers": workers if workers != s.workers else None,
                               "train.micro_batch_size": r if r != s.rows else None,
                               _gen_key(cfg): gen if gen != s.gen else None}
                    changes = {k: val for k, val in changes.items() if val is not None}
                    options.append((gen != s.gen, len(changes), workers, -r, changes, v))
    for *_, changes, v in sorted(options, key=lambda o: o[:4]):
        need = sum(learner_parts(shape, v).values()) / GIB
        if need <= gpu_memory_gb:
            return f"set {' '.join(f'{k}={val}' for k, val in changes.items())} ({need:.1f} GB)"
    return "no learner setting tried fits (up to 16 FSDP ranks, micro-batch 1, a quarter of the rollout length)"


def _rollout_fix(shape: ModelShape, cfg: RunConfig, gpu_memory_gb: float) -> str:
    prompt, gen = worst_case_lengths(cfg)
    for g in (gen, gen // 2, gen // 4):
        for rows in (cfg.sampler.batch_size >> i for i in range(cfg.sampler.batch_size.bit_length())):
            phases = rollout_phases(shape, rows, prompt, g, cfg.model.block_size, _BYTES[cfg.model.dtype])
            need = max(sum(p.values()) for p in phases.values()) / GIB
            if need <= gpu_memory_gb:
                lower = f" {_gen_key(cfg)}={g}" if g != gen else ""
                return f"set sampler.batch_size={rows}{lower} ({need:.1f} GB)"
    return "no sampler.batch_size fits even at a quarter of the rollout length"


def _teacher_fix(shape: ModelShape, cfg: RunConfig, gpu_memory_gb: float) -> str:
    """The largest vLLM reservation (in 0.05 steps) that leaves room for the log-probs beside it, still
    holding the weights twice over (weights and KV cache); fewer concurrent requests when none does."""
    weights = 2 * shape.params / GIB
    batch = cfg.teacher.batch_size
    while batch >= 1:
        t = cfg.teacher.model_copy(update={"batch_size": batch, "gpu_memory_utilization": 1.0})
        extra = sum(teacher_parts(shape, cfg.model_copy(update={"teacher": t}), 0.0).values()) / GIB
        utilization = math.floor(20 * (gpu_memory_gb - extra) / gpu_memory_gb) / 20
        if utilization * gpu_memory_gb >= 2 * weights and utilization > 0:
            fewer = f"teacher.batch_size={batch} " if batch != cfg.teacher.batch_size else ""
            return f"set {fewer}teacher.gpu_memory_utilization={utilization:.2f}"
        batch //= 2
    return "the teacher's log-probs do not fit beside its weights: shorten the rollouts or use a larger GPU"


_FIXES = {"learner": _learner_fix, "rollout": _rollout_fix, "teacher": _teacher_fix}
