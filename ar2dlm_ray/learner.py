"""The optimisation half of training: student, AdamW, schedule, and one training step on a rollout batch.
Shared by the local trainer and the learner actors.

A training step consumes one rollout batch. It takes `updates_per_batch` passes over the batch, each pass
one optimiser step per minibatch (`minibatch_size`; the whole batch when unset), as the reference trains a
128-prompt batch with 16 steps of 8. Weight versions, staleness and checkpoints count training steps; the
learning-rate schedule counts optimiser steps.

Mixed precision: with a bfloat16/float16 student, AdamW updates float32 master copies of the weights and
the low-precision model (which computes, samples and is published) is refreshed from them after each step.
Updating bf16 weights directly rounds most lr-1e-5 updates to nothing; `train.master_weights: false`
opts into that anyway.

Sharded (the Ray learners, `shard`): torch FSDP2 over the learner group, each decoder layer and the
root a unit. The float32 parameter shards are the master weights, AdamW state is sharded with them, compute
runs in the model's dtype and gradients are reduce-scattered (averaged over ranks) in float32. Each rank
trains its own rollout batch, as data parallelism does.
"""

from __future__ import annotations

import torch

from torch.distributed.tensor import DTensor

from .config import RunConfig
from .curriculum import lr_factor
from .losses import objective
from .rollout import RECIPES
from .states import Rollout, build_batch
from .student import Student


def minibatches(n: int, k: int) -> list[range]:
    """k disjoint contiguous index ranges covering n items, as equal as possible. A full rollout batch
    splits into minibatches of exactly `minibatch_size`; a short one (the end of an epoch) into k smaller
    ones, so that every data-parallel rank takes the same number of optimiser steps."""
    return [range(i * n // k, (i + 1) * n // k) for i in range(k)]


def shard(student: Student, compute_dtype: torch.dtype, device: str = "cpu", from_rank0: bool = False) -> None:
    """FSDP2 over the current process group, in place: every decoder layer (the model's `_no_split_modules`)
    and then the root is a unit; parameters become float32 shards on `device`, computed in `compute_dtype`.
    A model on the CPU moves to `device` shard by shard: no GPU ever holds the whole float32 model.

    `from_rank0` (every rank passes it): the weights and buffers are rank 0's, sent to the others shard by
    shard, so the other ranks may hold the model on the meta device only (a host that runs 4 ranks of an 8B
    student then loads 32 GB of float32 weights once, not four times)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = student.model.float()
    # Rank 0's full weights, by reference (sharding replaces the parameters, not these tensors).
    full = dict(model.state_dict()) if from_rank0 and dist.get_rank() == 0 else {}
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if from_rank0:
        if dist.get_rank() != 0:
            model.to_empty(device=device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # rotary tables are not in the state dict, and meta ones are empty
            dist.broadcast(buffer, src=0)
    student.compute_dtype = compute_dtype


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A state entry in full, floating ones in `dtype`: a shard is all-gathered (a collective: every rank must
    gather the same entries in the same order). One entry at a time, never a float32 copy of the model."""
    t = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
    return t.to(dtype) if t.is_floating_point() else t


class Learner:
    def __init__(self, student: Student, cfg: RunConfig, total_steps: int):
        self.student, self.cfg, self.total_steps = student, cfg, total_steps
        self.recipe = RECIPES[cfg.train.recipe]
        tok = student.tokenizer
        self.pad_id = tok.pad_token_id
        self.eos_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        t = cfg.train
        self.minibatches_per_pass = t.rollout_batch_size // (t.minibatch_size or t.rollout_batch_size)
        self.optimizer_steps_per_step = t.updates_per_batch * self.minibatches_per_pass
        self.params = [p for p in student.model.parameters() if p.requires_grad]
        self.sharded = is_sharded(student.model)
        if t.activation_checkpointing:  # active in train mode only: sampling and evaluation keep their speed
            student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.master = None
        if not self.sharded and student.dtype != torch.float32 and t.master_weights:
            self.master = [p.detach().float().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master or self.params, lr=t.lr, weight_decay=t.weight_decay)
        total_updates = total_steps * self.optimizer_steps_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_updates, t.warmup_steps, t.lr, t.min_lr))
        # Called between backward and clipping; data-parallel learners all-reduce gradients here.
        self.grad_hook = None

    def train_step(self, rollouts: list[Rollout], targets, step: int) -> dict:
        """All optimiser steps of one rollout batch. Returns the step's means and, under `updates`, the
        loss, gradient norm, learning rate and supervised tokens of every optimiser step.

        The states are drawn from a generator seeded by the step, so a resumed run repeats them.
        """
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        self.student.model.train()
        updates = []
        for _ in range(self.cfg.train.updates_per_batch):
            for part in minibatches(len(rollouts), self.minibatches_per_pass):
                updates.append(self._update([rollouts[i] for i in part],
                                            None if targets is None else [targets[i] for i in part], gen))
        self.student.model.eval()
        n = len(updates)
        return {"loss": sum(u["loss"] for u in updates) / n, "grad_norm": sum(u["grad_norm"] for u in updates) / n,
                "lr": updates[0]["lr"], "supervised_tokens": sum(u["supervised_tokens"] for u in updates),
                "optimizer_steps": n, "updates": updates}

    def _update(self, rollouts: list[Rollout], targets, gen: torch.Generator) -> dict:
        """One optimiser step on a minibatch (gradient accumulation over micro-batches)."""
        cfg = self.cfg
        for p in self.params:
            p.grad = None
        total, loss_sum, supervised = len(rollouts), 0.0, 0
        for lo in range(0, total, cfg.train.micro_batch_size):
            chunk = rollouts[lo:lo + cfg.train.micro_batch_size]
            batch = build_batch(chunk, self.student.spec, self.pad_id, states=self.recipe.states,
                                eos_ids=self.eos_ids, supervise_eos=cfg.train.supervise_eos,
                                targets=targets[lo:lo + len(chunk)] if targets is not None else None,
                                generator=gen).to(self.student.device)
            supervised += batch.stats["supervised"]
            loss = objective(self.student.supervised_logits(batch), batch, self.student.spec.teacher_vocab_size,
                             cfg.train.divergence, cfg.train.jsd_beta, cfg.teacher.tail,
                             cfg.train.loss_chunk_tokens) * (len(chunk) / total)
            loss.backward()
            loss_sum += loss.item()
        if self.grad_hook is not None:
            self.grad_hook()
        stepped = self.params
        if self.master is not None:
            for m, p in zip(self.master, self.params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
            stepped = self.master
        grad_norm = torch.nn.utils.clip_grad_norm_(stepped, cfg.train.grad_clip)
        if isinstance(grad_norm, DTensor):  # the shards' partial norms, reduced over the group
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        for m in stepped:  # float32 gradients (4 bytes a parameter) must not live on into the next forward
            m.grad = None
        if self.master is not None:
            self._copy_master_to_model()
        return {"loss": loss_sum, "grad_norm": float(grad_norm), "lr": lr, "supervised_tokens": supervised}

    @torch.no_grad()
    def _copy_master_to_model(self) -> None:
        for m, p in zip(self.master, self.params):
            p.copy_(m)

    @torch.no_grad()
    def reset_master(self) -> None:
        """Take the master weights from the model (after its weights were replaced from outside)."""
        if self.master is not None:
            for m, p in zip(self.master, self.params):
                m.copy_(p)

    def sharded_state(self) -> dict:
        """Sharded: the float32 parameter shards and AdamW state of this rank (for torch.distributed.checkpoint,
        which can load them into another number of ranks)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.student.model),
                "optim": get_optimizer_state_dict(self.student.model, self.optimizer)}

    def load_sharded_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.student.model, state["model"])
        set_optimizer_state_dict(self.student.model, self.optimizer, state["optim"])

    def state_dict(self) -> dict:
        """Unsharded: optimiser, schedule and master weights. Sharded: the schedule alone (the rest:
        `sharded_state`)."""
        if self.sharded:
            return {"optimizer": None, "scheduler": self.scheduler.state_dict()}
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.master is not None:
            state["master_weights"] = [m.detach().clone() for m in self.master]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Optimiser, schedule and (mixed precision) the master weights; call after the model's weights were
        loaded. A checkpoint without master weights starts them from the model's. Sharded: the schedule (the
        rest: `load_sharded_state`)."""
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sharded:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.master is None:
            return
        if "master_weights" in state:
            with torch.no_grad():
                for m, saved in zip(self.master, state["master_weights"]):
                    m.copy_(saved)
            self._copy_master_to_model()
        else:
            self.reset_master()
