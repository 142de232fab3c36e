"""Ray metrics (exported to Prometheus and the dashboard) for the training system.

Each process records what it observes: rollout workers their throughput, teacher servers theirs, the
learner its step, queue depth and staleness; the driver the retries it performs. Names are prefixed
`ar2dlm_`; Ray adds `ray_` when exporting. Every sample is tagged with its `pool` (rollout, teacher,
learner, driver), its `actor` (the actor's name, e.g. `rollout-1`) and the `run` (`logging.run_name`).
"""

from __future__ import annotations

import ray
from ray.util import metrics

_GAUGES = {
    "queue_depth": "scored rollout batches waiting for the learners (seen by the driver at each step's start)",
    "rollouts_per_s": "rollouts produced per second by a worker",
    "generated_tokens_per_s": "student tokens generated per second by a worker",
    "teacher_tokens_per_s": "tokens scored per second by a teacher replica",
    "learner_step_s": "seconds per learner optimiser step",
    "loss": "training loss",
    "kl": "forward KL to the teacher on the training states",
    "weight_version": "newest published weight version",
    "version_lag": "learner step minus the version that produced the rollout",
    "weight_publish_s": "seconds to publish one weight version",
    "pool_size": "actors in the pool (starting or active)",
    "pool_busy": "fraction of the last step the pool's actors were busy",
}
_COUNTERS = {
    "rollouts_total": "rollouts produced",
    "staleness_drops_total": "rollouts dropped because they were too stale",
    "regenerated_total": "rollouts regenerated because they were too stale",
    "duplicates_discarded_total": "rollouts of a batch delivered again after it was trained or dropped",
    "retries_total": "requests retried after an actor died",
}


TAG_KEYS = ("pool", "actor", "run")


class Metrics:
    """Lazily created metric objects; `set(name, value)` for gauges, `inc(name, n)` for counters. In an
    actor, `actor` defaults to the actor's own name (a restarted actor keeps it); `run` comes from the
    config, whose `logging.run_name` the driver fixes before it builds the pools."""

    def __init__(self, pool: str, run: str, actor: str | None = None):
        actor = actor or ray.get_runtime_context().get_actor_name() or pool
        self.tags = {"pool": pool, "actor": actor, "run": run}
        self._made: dict = {}

    def _get(self, name: str):
        if name not in self._made:
            kind, doc = (metrics.Gauge, _GAUGES[name]) if name in _GAUGES else (metrics.Counter, _COUNTERS[name])
            self._made[name] = kind(f"ar2dlm_{name}", doc, tag_keys=TAG_KEYS)
        return self._made[name]

    def set(self, name: str, value) -> None:
        if value is not None:
            self._get(name).set(float(value), tags=self.tags)

    def inc(self, name: str, n: float = 1) -> None:
        if n:
            self._get(name).inc(float(n), tags=self.tags)


METRIC_NAMES = [f"ar2dlm_{n}" for n in (*_GAUGES, *_COUNTERS)]
