"""Measured memory of the learner's optimiser step and the rollout worker's decoding, without allocating them.

The real code paths (`Learner.train_step`, the sampler's `_CachedContext`) run on a model whose weights are
fake tensors (`FakeTensorMode`: shapes and dtypes, no storage), built from a config.json alone, while
`MemTracker` counts every tensor that the step creates, frees or keeps. Runs on CPU in seconds for an 8B
model; it is the check of the plan's formulas (plan.py).

The batches are real: `build_batch` lays out real token ids on CPU, so the index arithmetic that picks the
supervised positions runs on real values. Fake tensors carry no values, so the two kinds of value-dependent
operation that touch them are answered here (`_FakeValues`): a boolean mask (real) indexing a fake tensor
becomes the mask's real indices, and a scalar read of a fake tensor (the loss and gradient norm that are
logged, AdamW's step count) reads 1. Neither decides the size of any tensor.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from .config import RunConfig
from .plan import learner_strategy, worst_case_lengths


class _FakeValues(TorchDispatchMode):
    """Answers the value-dependent operations on fake tensors (see the module's docstring)."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return 1.0 if args[0].dtype.is_floating_point else 1
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                    torch.ops.aten.index_put_.default) and isinstance(args[0], FakeTensor):
            indices = [i.nonzero().squeeze(1) if _real_bool(i) else i for i in args[1]]
            return func(args[0], indices, *args[2:], **kwargs)
        return func(*args, **kwargs)


class _StepTracker(MemTracker):
    """MemTracker across the several forward passes of one optimiser step (gradient accumulation): the
    module-wise statistics, which are not read here, restart at each new forward of the root module; the
    global peak runs across them."""

    def _pre_fw_hook(self, module, inputs) -> None:
        name = self._mod_tracker.get_known_fqn(module)
        if (module in self.memory_tracking and not self._mod_tracker.is_bw
                and set(self._mod_tracker.parents) - {name} == {"Global"}):
            self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)


def _real_bool(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.dtype == torch.bool


def fake_model(model_config: dict, mode: FakeTensorMode | None, dtype: torch.dtype = torch.bfloat16):
    """A causal LM of the config.json's architecture with fake weights (no memory, no initialisation cost
    beyond the graph of fake operations)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(model_config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with mode or contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _student(model_config: dict, cfg: RunConfig, mode: FakeTensorMode):
    from .student import Student, StudentSpec

    vocab = model_config["vocab_size"]
    # The learner reads only the pad and EOS ids of a tokenizer; ids that no rollout here contains.
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=vocab - 2)
    spec = StudentSpec(mask_id=vocab - 1, mask_token="<|mask|>", block_size=cfg.model.block_size,
                       shift=cfg.model.shift, teacher_vocab_size=vocab)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.model.dtype]
    return Student(fake_model(model_config, mode, dtype), tokenizer, spec)


@contextlib.contextmanager
def _fake_group(world: int):
    """Rank 0 of a fake process group of `world` ranks: collectives return at once, with outputs of the
    right shapes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("measuring a sharded learner needs a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_student(model_config: dict, cfg: RunConfig, mode: FakeTensorMode):
    """Rank 0 of `learner.num_workers` FSDP2 ranks (the learner's `shard`) in a fake process group: the model
    is built on the meta device, sharded, then given fake shards."""
    from .learner import shard

    with torch.device("meta"):
        student = _student(model_config, cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"dtype": "float32"})}), None)
    shard(student, {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.model.dtype])
    with mode:
        student.model.to_empty(device="cpu")
    return student


def _peak(tracker: MemTracker) -> dict:
    """The peak snapshot as {"total": bytes, "parts": {kind: bytes}} (one device: the CPU of the fake tensors)."""
    (snap,) = tracker.get_tracker_snapshot("peak").values()
    parts = {str(getattr(k, "value", k)).lower(): v for k, v in snap.items() if k != "Total" and v}
    return {"total": snap["Total"], "parts": parts}


def measure_learner(cfg: RunConfig, model_config: dict) -> dict:
    """Peak bytes of one learner optimiser step on worst-case rollouts: the longest prompt and rollout,
    every generated position supervised (all revealed at step 0, so every block's state is fully masked),
    teacher top-k targets (`teacher.top_k`; the full vocabulary when it is unset). The step is the second
    one, so AdamW's moments exist, and it takes two micro-batches when the minibatch allows, so the
    accumulated gradients are resident while the second micro-batch runs. A sharded learner (learner
    strategy fsdp) is rank 0 of `learner.num_workers` in a fake process group."""
    t = cfg.train
    sharded = learner_strategy(cfg) == "fsdp"
    rows = min(t.minibatch_size or t.rollout_batch_size, 2 * t.micro_batch_size)
    cfg = cfg.model_copy(update={"train": t.model_copy(update={"rollout_batch_size": rows, "minibatch_size": rows,
                                                               "updates_per_batch": 1})})
    P, L = worst_case_lengths(cfg)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_group(cfg.learner.num_workers) if sharded else contextlib.nullcontext():
        return _measure_step(cfg, model_config, mode, sharded, rows, P, L)


def _measure_step(cfg: RunConfig, model_config: dict, mode: FakeTensorMode, sharded: bool, rows: int, P: int,
                  L: int) -> dict:
    from .learner import Learner
    from .states import Rollout
    from .teacher import TokenTargets

    student = (_sharded_student if sharded else _student)(model_config, cfg, mode)
    with mode:
        learner = Learner(student, cfg, total_steps=2)
    vocab = model_config["vocab_size"]
    k = cfg.teacher.top_k or vocab
    rollouts = [Rollout([1] * P, [2] * L, [0] * L) for _ in range(rows)]
    ids = None if cfg.teacher.top_k is None else torch.arange(k).repeat(L, 1)
    targets = [TokenTargets(torch.full((L, k), -math.log(k)), ids) for _ in range(rows)]
    with _FakeValues():
        learner.train_step(rollouts, targets, 0)
    tracker = _StepTracker()
    tracker.track_external(student.model, learner.optimizer, *(learner.master or []))
    with tracker, _FakeValues():
        learner.train_step(rollouts, targets, 1)
    return {**_peak(tracker), "rows": rows, "prompt": P, "generated": L}


def measure_rollout(cfg: RunConfig, model_config: dict) -> dict:
    """Peak bytes of a rollout worker: the prefill of a `sampler.batch_size` batch of the longest prompts,
    and a block step of the last block (the KV cache at its longest), each through the sampler's
    `_CachedContext`."""
    from .sampler import _CachedContext, layout_prompts

    P, L = worst_case_lengths(cfg)
    B = cfg.model.block_size
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    student = _student(model_config, cfg, mode)
    rows = cfg.sampler.batch_size

    def layout():
        return layout_prompts([[1] * P for _ in range(rows)], B, L, 0, "cpu")

    prefill = MemTracker()
    prefill.track_external(student.model)
    seq, positions, key_valid, width = layout()
    with prefill, _FakeValues(), torch.no_grad():
        _CachedContext(student, seq, positions, key_valid, width)
    # The last block: the cache holds everything before it (the keys and values that the earlier blocks'
    # steps left, made here directly rather than by a prefill of P + L - 2B positions), the previous block
    # is pending and the step runs both against the cache.
    seq, positions, key_valid, _ = layout()
    key_valid[:] = True
    with _FakeValues(), torch.no_grad():
        ctx = _CachedContext(student, seq, positions, key_valid, B)
        ctx.cache = _filled_cache(student, rows, P + L - 2 * B, mode)
        ctx.finish_block(seq[:, P + L - 2 * B:P + L - B], P + L - 2 * B)
    step = MemTracker()
    step.track_external(student.model, *_cache_tensors(ctx.cache), ctx.carry, ctx.pending)
    with step, _FakeValues(), torch.no_grad():
        ctx.block_logits(seq[:, P + L - B:], P + L - B)
    phases = {"prefill": _peak(prefill), "block_step": _peak(step)}
    worst = max(phases, key=lambda name: phases[name]["total"])
    return {**phases[worst], "phase": worst, "phases": {k: v["total"] for k, v in phases.items()},
            "rows": rows, "prompt": P, "generated": L}


def _filled_cache(student, rows: int, length: int, mode: FakeTensorMode):
    from transformers import DynamicCache

    config, cache = student.model.config, DynamicCache()
    shape = (rows, config.num_key_value_heads, length,
             getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    with mode:
        for layer in range(config.num_hidden_layers):
            cache.update(torch.empty(shape, dtype=student.dtype), torch.empty(shape, dtype=student.dtype), layer)
    return cache


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]


def bench_memory(cfg: RunConfig, model_info: dict) -> dict:
    """Each measured role beside the plan's estimate (`ar2dlm bench memory`)."""
    from .plan import GIB, ModelShape, LearnerSettings, learner_parts, rollout_parts

    shape = ModelShape.from_config(model_info)
    estimates = {"learner": learner_parts(shape, LearnerSettings.from_config(cfg, shape.vocab)),
                 "rollout": rollout_parts(shape, cfg)}
    measured = {"learner": measure_learner(cfg, model_info), "rollout": measure_rollout(cfg, model_info)}
    roles = {}
    for role, m in measured.items():
        plan_gb = sum(estimates[role].values()) / GIB
        roles[role] = {"measured_gb": round(m["total"] / GIB, 3), "plan_gb": round(plan_gb, 3),
                       "plan_over_measured": round(plan_gb * GIB / m["total"], 4),
                       "measured_parts_gb": {k: round(v / GIB, 3) for k, v in m["parts"].items()},
                       **{k: v for k, v in m.items() if k not in ("total", "parts", "phases")}}
    return {"model_params": shape.params, "strategy": learner_strategy(cfg),
            "learner_workers": cfg.learner.num_workers, "roles": roles}
