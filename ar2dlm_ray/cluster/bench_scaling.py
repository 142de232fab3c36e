"""Scaling benchmark: does growing the producer pools pay under the default admission
(`learner.max_staleness: auto`, admission.py)?

Real: the micro pipeline at pools rollout/teacher/learner 1/1/1, 2/2/1 and 3/2/1, one run each, one after the
other on one embedded Ray (each actor one logical CPU, whatever cores the machine has): trained tokens/s over
the steady steps (bench.py's `_measure`) against 1/1/1's, the stale-drop fraction of the rollouts, the staleness
bound and the largest version lag.
Simulated: the real driver, queues and actors with stand-in stage costs (simulate.py, `balanced` 4 : 2 : 1 per
batch) at 1/1/1, 2/2/1, 3/2/1 and 16/8/4. With fixed stage costs the bound grows 2x, 3x and 16x from 1/1/1, so
the speed-up is each run's throughput against its bound, over 1/1/1's, times that (the runs' clocks are
compressed to differing degrees so that none takes long).

`ar2dlm bench scaling [--quick] [key=value ...]` (--quick: the real runs only)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray

from ..config import load_config
from .bench import _measure
from .bench_orchestration import Spec, bench_orchestration

POOLS = ((1, 1, 1), (2, 2, 1), (3, 2, 1))
# Batches/s of each bound at one fixed stage time (rollout 4 s, scoring 2 s, training 1 s per batch); 16/8/4
# runs at half that clock, which the driver on two cores keeps up with.
SIMULATED = (((1, 1, 1), 0.25, 12), ((2, 2, 1), 0.5, 16), ((3, 2, 1), 0.75, 20), ((16, 8, 4), 2.0, 24))
BOUND_GAIN = {(1, 1, 1): 1, (2, 2, 1): 2, (3, 2, 1): 3, (16, 8, 4): 16}


def _name(pools: tuple[int, int, int]) -> str:
    return "/".join(map(str, pools))


def real(config: str, overrides: list[str], log=print) -> dict:
    from .driver import RayTrainer

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r, t, l in POOLS:
            out = Path(tmp) / f"{r}-{t}-{l}"
            cfg = load_config(config, ["mode=ray", "ray.num_cpus=8", *overrides, f"train.out_dir={out}",
                                       f"rollout.num_workers={r}", f"teacher.num_replicas={t}",
                                       f"learner.num_workers={l}", "logging.progress=false"])
            trainer = RayTrainer(cfg, lambda *a: None)
            try:
                summary = trainer.run()
            finally:
                trainer.close()
            metrics = [json.loads(line) for line in (out / cfg.logging.metrics_file).read_text().splitlines()]
            acc = summary["accounting"]
            runs[_name((r, t, l))] = {
                **_measure(metrics), "stale_drop_fraction": acc["dropped_stale"] / max(1, acc["rolled_out"]),
                "dropped_stale": acc["dropped_stale"], "rolled_out": acc["rolled_out"],
                "staleness_bound": metrics[-1]["staleness_bound"],
                "version_lag_max": max(m["version_lag"] for m in metrics),
                "in_flight_mean": sum(m["queue_depth"] for m in metrics) / len(metrics)}
            log(f"[bench] real {_name((r, t, l))}: {runs[_name((r, t, l))]}")
    base = runs[_name(POOLS[0])]["trained_tokens_per_s"]
    return {"runs": runs, "speedup": {k: v["trained_tokens_per_s"] / base for k, v in runs.items()}}


def simulated(config: str, log=print) -> dict:
    specs = tuple(Spec(f"balanced-{_name(p)}", p, "balanced", rate, steps) for p, rate, steps in SIMULATED)
    # The run's own admission (auto), not the orchestration benchmark's never-limiting bound.
    result = bench_orchestration(config, ["learner.max_staleness=auto", "ray.queue_size=4"], log=log, specs=specs)
    runs = {tuple(r["pools"][k] for k in ("rollout", "teacher", "learner")): r for r in result["runs"]}
    base = runs[(1, 1, 1)]["throughput_vs_bound"]
    return {"speedup": {_name(p): runs[p]["throughput_vs_bound"] / base * BOUND_GAIN[p] for p in runs},
            "bound_gain": {_name(p): BOUND_GAIN[p] for p in runs},
            "throughput_vs_bound": {_name(p): r["throughput_vs_bound"] for p, r in runs.items()},
            "busy": {_name(p): r["busy"] for p, r in runs.items()},
            "version_lag_max": {_name(p): r["version_lag_max"] for p, r in runs.items()},
            "none_dropped": {_name(p): r["accounting"]["checks"]["none_dropped_or_discarded"] for p, r in runs.items()}}


def bench_scaling(config: str, overrides: list[str], quick: bool = False, log=print) -> dict:
    out = {"real": real(config, overrides, log)}
    if ray.is_initialized():
        ray.shutdown()  # the simulation starts its own Ray, with 64 logical CPUs
    if not quick:
        out["simulated"] = simulated(config, log)
    return out
