"""Pipeline benchmark: the same Ray run synchronous (`max_staleness: 0`, rollout and training take
turns) and asynchronous (rollouts produced while the learner trains), on one Ray instance, alternated
`repeats` times. Reports steps/s and their ratio, the learner's busy fraction, and weight publication
time per learner step. The first step of each run (warm-up) is left out.

`ar2dlm bench pipeline --config configs/micro.yaml [key=value ...] [--repeats N] [--out F]`
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from ..config import load_config


def _measure(metrics: list[dict]) -> dict:
    steady = metrics[1:] or metrics
    wall = sum(m["step_s"] for m in steady)
    train = sum(m["train_s"] for m in steady)
    publish = [m["publish_s"] for m in steady if m["publish_s"] is not None]
    tokens = steady[-1]["tokens_trained"] - (metrics[0]["tokens_trained"] if len(metrics) > 1 else 0)
    return {"steps_per_s": len(steady) / wall, "trained_tokens_per_s": tokens / wall, "learner_busy": train / wall,
            "publish_per_step": (statistics.mean(publish) / (train / len(steady))) if publish else None}


def bench_pipeline(config: str, overrides: list[str], repeats: int = 1, log=print) -> dict:
    from .driver import RayTrainer

    variants = {"sync": ["learner.max_staleness=0"], "async": ["learner.max_staleness=1"]}
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
