"""The optimisation half of training: student, AdamW, schedule, and one step on a batch of rollouts.
Shared by the local trainer and the learner actors."""

from __future__ import annotations

import torch

from .config import RunConfig
from .curriculum import lr_factor
from .losses import objective
from .rollout import RECIPES
from .states import Rollout, build_batch
from .student import Student


class Learner:
    def __init__(self, student: Student, cfg: RunConfig, total_steps: int):
        self.student, self.cfg, self.total_steps = student, cfg, total_steps
        self.recipe = RECIPES[cfg.train.recipe]
        tok = student.tokenizer
        self.pad_id = tok.pad_token_id
        self.eos_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        t = cfg.train
        self.optimizer = torch.optim.AdamW(student.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, t.warmup_steps, t.lr, t.min_lr))
        # Called between backward and clipping; data-parallel learners all-reduce gradients here.
        self.grad_hook = None

    def train_step(self, rollouts: list[Rollout], targets, step: int) -> dict:
        """One optimiser step over all rollouts (gradient accumulation over micro-batches).

        The states are drawn from a generator seeded by the step, so a resumed run repeats them.
        """
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
        model = self.student.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, loss_sum, supervised = len(rollouts), 0.0, 0
        for lo in range(0, total, cfg.train.micro_batch_size):
            chunk = rollouts[lo:lo + cfg.train.micro_batch_size]
            batch = build_batch(chunk, self.student.spec, self.pad_id, states=self.recipe.states,
                                eos_ids=self.eos_ids, supervise_eos=cfg.train.supervise_eos,
                                targets=targets[lo:lo + len(chunk)] if targets is not None else None,
                                generator=gen).to(self.student.device)
            supervised += batch.stats["supervised"]
            logits, _ = self.student.forward(batch.input_ids, batch.positions, batch.allowed)
            loss = objective(logits, batch, self.student.spec.teacher_vocab_size, cfg.train.divergence,
                             cfg.train.jsd_beta, cfg.teacher.tail) * (len(chunk) / total)
            loss.backward()
            loss_sum += loss.item()
        if self.grad_hook is not None:
            self.grad_hook()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        model.eval()
        return {"loss": loss_sum, "grad_norm": float(grad_norm), "lr": lr, "supervised_tokens": supervised}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
