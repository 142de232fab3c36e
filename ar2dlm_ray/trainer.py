"""The single-process trainer: OPDLM and its baselines without Ray (OPDLM.md §6-§9).

This is the reference the distributed system must agree with. One loop iteration is one rollout batch:
produce x0 (student rollouts, teacher generations or corpus text), score it with the teacher when the
recipe distils, then take `updates_per_batch` optimiser steps on training states built from it.
Everything random is seeded by (train.seed, batch or step index), so a resumed run replays the same
data order and the same rollouts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from .config import RunConfig, dump_config
from .learner import Learner
from .progress import Progress
from .rollout import RECIPES, X0Producer
from .runs import RunStorage, StopRequest, check_run_dir, checkpoint_due, flops, prepare_run_dir, save_dir
from .models import build_student, param_count, resolve_teacher_path
from .student import load_student
from .teacher import build_teacher
from .tracking import Tracker, run_name, saved_run_name


class LocalTrainer:
    def __init__(self, cfg: RunConfig, log: Callable = print):
        self.cfg, self.log = cfg, log
        self.recipe = RECIPES[cfg.train.recipe]
        torch.manual_seed(cfg.train.seed)
        self.teacher_path = resolve_teacher_path(cfg, log)
        self.student = build_student(cfg, self.teacher_path)
        self.teacher = build_teacher(cfg, self.teacher_path)
        self.x0 = X0Producer(cfg, self.student, self.teacher, self.teacher_path)
        self.total_steps = cfg.train.max_steps or self.x0.order.batches_per_epoch
        self.learner = Learner(self.student, cfg, self.total_steps)
        self.run_dir = RunStorage(cfg.train.out_dir)
        self.step, self.next_batch = 0, 0
        self.accounting = {"prompts_consumed": 0, "rolled_out": 0, "scored": 0, "trained_on": 0,
                           "dropped_stale": 0, "retried": 0, "tokens_trained": 0, "sampler_forwards": 0,
                           "generated_tokens": 0}
        self.n_student = param_count(self.student.model)
        self.n_teacher = param_count(self.teacher.model) if hasattr(self.teacher, "model") else self.n_student

    def run(self, resume: bool = False, after_batch: Callable[["LocalTrainer"], bool] | None = None,
            overwrite: bool = False, allow_change: tuple[str, ...] = ()) -> dict:
        """Train to `train.max_steps`; `after_batch(self)` runs after each rollout batch (checkpointed or
        not) and stops training early by returning True (the experiment runner's budget evaluations).
        `resume` continues the run in train.out_dir, `overwrite` replaces it (see runs.prepare_run_dir)."""
        cfg = self.cfg
        metrics_path, resumed = prepare_run_dir(self.run_dir, cfg, resume, overwrite, allow_change, self.log)
        if resumed:
            self._resume(*resumed)
        stop = StopRequest()
        self.log(f"[train] recipe={cfg.train.recipe} steps={self.total_steps} prompts={len(self.x0.prompts)} "
                 f"student={self.n_student / 1e6:.2f}M params, block={self.student.spec.block_size} "
                 f"shift={self.student.spec.shift} start_step={self.step}")
        batch_index = self.next_batch
        progress = Progress(self.step, self.total_steps, self.accounting["tokens_trained"])
        tracker = Tracker(cfg, self.log)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            x0 = self.x0.produce(batch_index, version=self.step)
            rollouts, gen_len = x0.rollouts, x0.gen_len
            t1 = time.perf_counter()
            targets = None
            if self.recipe.distill:
                targets = self.teacher.score([(r.prompt_ids, r.tokens) for r in rollouts])
            t2 = time.perf_counter()
            tokens = sum(len(r.tokens) for r in rollouts)
            acc = self.accounting
            acc["prompts_consumed"] += len(x0.indices)
            acc["rolled_out"] += len(rollouts)
            acc["scored"] += len(rollouts) if targets is not None else 0
            acc["sampler_forwards"] += x0.sampler_forwards
            acc["generated_tokens"] += tokens
            t3 = time.perf_counter()
            stats = self.learner.train_step(rollouts, targets, self.step)
            self.step += 1
            acc["trained_on"] += len(rollouts)
            acc["tokens_trained"] += tokens
            now = time.perf_counter()
            record = {
                "step": self.step, "batch": batch_index, "recipe": cfg.train.recipe, **stats,
                "kl": stats["loss"] if self.recipe.distill and cfg.train.divergence == "forward_kl" else None,
                "gen_len_limit": gen_len, "mean_gen_len": tokens / max(1, len(rollouts)),
                "tokens_trained": acc["tokens_trained"],
                "tokens_per_forward": tokens / x0.sampler_forwards if x0.sampler_forwards else None,
                "rollout_s": t1 - t0, "teacher_s": t2 - t1, "train_s": now - t3, "step_s": now - t0,
                "tokens_per_s": tokens / (now - t0), **self.flops(),
            }
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            tracker.log(self.step, record)
            if cfg.logging.progress and self.step % cfg.logging.log_every == 0:
                self.log(progress.line(self.step, stats["loss"], acc["tokens_trained"], 0,
                                       f"len {record['mean_gen_len']:.1f}/{gen_len} tokens {acc['tokens_trained']} "
                                       f"tok/fwd {record['tokens_per_forward'] or float('nan'):.2f} "
                                       f"{record['step_s']:.1f}s"))
            batch_index += 1
            self.next_batch = batch_index
            if checkpoint_due(self.step, self.total_steps, cfg.train.checkpoint_every) or stop.requested:
                ckpt = self.checkpoint()
                if stop.requested:
                    raise stop.stopped(self.step, ckpt)
            if after_batch is not None and after_batch(self):
                break
        tracker.close()
        stop.restore()
        final = self.run_dir.location("final")
        save_dir(final, self.student.save)
        summary = {"final_student": final, "steps": self.step, "accounting": dict(self.accounting),
                   **self.flops()}
        (self.run_dir.local / "summary.json").write_text(json.dumps(summary, indent=2))
        self.run_dir.persist(cfg.logging.metrics_file, "tensorboard", "summary.json")
        self.log(f"[train] done: {self.step} steps, {self.accounting['tokens_trained']} training tokens, "
                 f"student saved to {final}")
        return summary

    def flops(self) -> dict:
        return flops(self.accounting, self.n_teacher, self.n_student, self.student.spec.block_size)

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint(self) -> str:
        """Write model, optimiser, scheduler, RNG, data position and accounting atomically (with a storage URI,
        after uploading the metrics up to this step)."""
        self.run_dir.persist(self.cfg.logging.metrics_file, "tensorboard")
        return self.run_dir.write_checkpoint(self.step, lambda where: save_dir(where, self.student.save), {
            "step": self.step, "next_batch": self.next_batch, **self.learner.state_dict(), "rng": torch.get_rng_state(),
            "accounting": dict(self.accounting), "config": dump_config(self.cfg),
        }, self.cfg.train.keep_checkpoints)

    def _resume(self, ckpt: Path, state: dict) -> None:
        loaded = load_student(ckpt / "student", self.cfg.model.dtype, self.cfg.model.device,
                              self.cfg.model.attn_implementation)
        self.student.model.load_state_dict(loaded.model.state_dict())
        self.learner.load_state_dict(state)
        torch.set_rng_state(state["rng"])
        self.step, self.next_batch = state["step"], state["next_batch"]
        self.accounting = dict(state["accounting"])
        self.log(f"[train] resumed from {ckpt.name}: step {self.step}, next rollout batch {self.next_batch}")


def train(cfg: RunConfig, resume: bool = False, log: Callable = print, overwrite: bool = False,
          allow_change: tuple[str, ...] = ()) -> dict:
    check_run_dir(cfg.train.out_dir, cfg.logging.metrics_file, resume, overwrite, cfg.ray.connect_timeout_s)  # before work
    if resume:
        cfg.logging.run_name = saved_run_name(cfg) or cfg.logging.run_name
    run_name(cfg)  # fixed before config.json is written: a resume takes it from there
    return LocalTrainer(cfg, log).run(resume=resume, overwrite=overwrite, allow_change=allow_change)
