"""Experiment tracking for both trainers: TensorBoard event files in <out_dir>/tensorboard/, and Weights &
Biases when `logging.wandb_project` is set and wandb is installed (it is never a dependency).

Each metrics.jsonl record becomes scalars under `train/` (loss, KL, learning rate, ...), `throughput/`
and `ray/` (version lag, queue depth, pool sizes); the per-optimiser-step losses go under `updates/` with
their own global step.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Callable

from .config import RunConfig
from .runs import RunStorage

# record key -> scalar tag; keys a record lacks (or holds None) are skipped.
SCALARS = {
    "loss": "train/loss", "kl": "train/kl", "grad_norm": "train/grad_norm", "lr": "train/lr",
    "mean_gen_len": "train/mean_gen_len", "tokens_per_forward": "train/tokens_per_forward",
    "tokens_per_s": "throughput/tokens_per_s", "step_s": "throughput/step_s", "rollout_s": "throughput/rollout_s",
    "teacher_s": "throughput/teacher_s", "train_s": "throughput/train_s", "tokens_trained": "throughput/tokens_trained",
    "version_lag": "ray/version_lag", "queue_depth": "ray/queue_depth", "wait_s": "ray/wait_s",
    "publish_s": "ray/publish_s", "dropped_stale": "ray/dropped_stale",
    "discarded_duplicates": "ray/discarded_duplicates", "regenerated": "ray/regenerated", "retried": "ray/retried",
}


def run_name(cfg: RunConfig) -> str:
    """The run's name, fixed on first use (`logging.run_name`, else <out_dir's name>-<start time>); set on the
    config so that every actor built from it afterwards tags its metrics alike."""
    if not cfg.logging.run_name:
        cfg.logging.run_name = f"{Path(cfg.train.out_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.logging.run_name


def saved_run_name(cfg: RunConfig) -> str | None:
    """The name that the run in train.out_dir started with (its config.json holds it), for its --resume: a
    resumed run stays one run in Grafana and W&B. None when `logging.run_name` names the run, or the run
    directory holds no name."""
    if cfg.logging.run_name:
        return None
    run = RunStorage(cfg.train.out_dir)
    run.fetch("config.json")
    try:
        return json.loads((run.local / "config.json").read_text())["logging"]["run_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Tracker:
    """`log(step, record)` after every step, `close()` at the end."""

    def __init__(self, cfg: RunConfig, log: Callable = print, pools: dict[str, int] | None = None):
        self.tb = self.wandb = None
        self.pools = pools or {}
        run_dir = RunStorage(cfg.train.out_dir).local  # a storage URI's staging directory, persisted by the trainers
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.logging.wandb_project:
            if importlib.util.find_spec("wandb") is None:
                log(f"[train] logging.wandb_project={cfg.logging.wandb_project!r} but wandb is not installed "
                    "(pip install wandb); logging to TensorBoard only")
            else:
                import wandb

                from .config import dump_config

                self.wandb = wandb.init(project=cfg.logging.wandb_project, name=run_name(cfg),
                                        dir=str(run_dir), config=dump_config(cfg))

    def log(self, step: int, record: dict) -> None:
        scalars = {tag: float(record[key]) for key, tag in SCALARS.items() if record.get(key) is not None}
        scalars.update({f"ray/pool_size/{pool}": float(n) for pool, n in (record.get("pools") or self.pools).items()})
        scalars.update({f"ray/busy/{pool}": float(f) for pool, f in (record.get("busy") or {}).items()})
        updates = [u["loss"] for u in record.get("updates") or []]
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            # Every step takes the same number of optimiser steps, so this numbering survives a resume.
            for i, loss in enumerate(updates):
                self.tb.add_scalar("updates/loss", loss, (step - 1) * len(updates) + i + 1)
            self.tb.flush()  # every step: a run that crashes or is stopped keeps all it logged
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
