"""Pipeline benchmark: the same Ray run synchronous (`max_staleness: 0`: roll out, score, train, publish,
in turn) and asynchronous (the three stages overlap), on one Ray instance, alternated `repeats` times.
Reports steps/s and their ratio, each pool's busy fraction (busy seconds per actor over the wall time),
their sum (at most 1 when the stages take turns; above 1 only when they overlap), each stage's seconds
per batch, and weight publication time per learner step. The first steps of each run (warm-up: actors
compiling and caching) are left out.

`ar2dlm bench pipeline --config configs/micro.yaml [key=value ...] [--repeats N] [--out F]`
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from ..config import load_config


WARMUP = 2


def _measure(metrics: list[dict]) -> dict:
    steady = metrics[WARMUP:] if len(metrics) > WARMUP + 1 else metrics
    wall = sum(m["step_s"] for m in steady)
    train = sum(m["train_s"] for m in steady)
    publish = [m["publish_s"] for m in steady if m["publish_s"] is not None]
    tokens = steady[-1]["tokens_trained"] - (metrics[len(metrics) - len(steady) - 1]["tokens_trained"]
                                             if len(steady) < len(metrics) else 0)
    busy = {pool: sum(m["busy"][pool] * m["step_s"] for m in steady) / wall for pool in steady[0]["busy"]}
    return {"steps_per_s": len(steady) / wall, "trained_tokens_per_s": tokens / wall, "learner_busy": train / wall,
            **{f"{pool}_busy": f for pool, f in busy.items() if pool != "learner"},
            "busy_sum": sum(busy.values()),
            "rollout_s_per_batch": statistics.mean(m["rollout_s"] for m in steady),
            "teacher_s_per_batch": statistics.mean(m["teacher_s"] for m in steady),
            "train_s_per_batch": train / len(steady),
            "publish_per_step": (statistics.mean(publish) / (train / len(steady))) if publish else None}


def bench_pipeline(config: str, overrides: list[str], repeats: int = 1, log=print) -> dict:
    from .driver import RayTrainer

    # async: a batch may be trained up to 2 versions after the weights that rolled it out, enough for three
    # stages to each hold one.
    variants = {"sync": ["learner.max_staleness=0"], "async": ["learner.max_staleness=2"]}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, extra in variants.items():
                out = Path(tmp) / f"{name}-{r}"
                cfg = load_config(config, [*overrides, *extra, "mode=ray", f"train.out_dir={out}",
                                           "logging.progress=false"])
                trainer = RayTrainer(cfg, lambda *a: None)
                try:
                    trainer.run()
                finally:
                    trainer.close()
                lines = (out / cfg.logging.metrics_file).read_text().splitlines()
                runs[name].append(_measure([json.loads(line) for line in lines]))
                log(f"[bench] {name} run {r + 1}: {runs[name][-1]}")
    med = {name: {k: statistics.median(m[k] for m in ms) if ms[0][k] is not None else None for k in ms[0]}
           for name, ms in runs.items()}
    return {**{f"{name}_{k}": v for name, m in med.items() for k, v in m.items()},
            "async_over_sync": med["async"]["trained_tokens_per_s"] / med["sync"]["trained_tokens_per_s"],
            "async_over_sync_steps": med["async"]["steps_per_s"] / med["sync"]["steps_per_s"], "repeats": repeats}
