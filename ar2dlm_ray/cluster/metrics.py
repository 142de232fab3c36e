"""Ray metrics (exported to Prometheus and the dashboard) for the training system.

Each process records what it observes: rollout workers their throughput, teacher servers theirs, the
learner its step, staleness and drops; the driver the batches in flight, the pools and the retries it
performs. Names are prefixed `ar2dlm_`; Ray adds `ray_` when exporting. Every sample is tagged with its `pool`
(rollout, teacher, learner, driver) and the `run` (`logging.run_name`, kept across resumes); all but the
pool gauges also with the `actor` (the actor's name, e.g. `rollout-1`).

Ray stops exporting a gauge about 20 s after it was last set, and keeps a counter of a dead process for good.
So every metric here is a gauge (totals too: the process's running total, which `rate()` reads as a counter),
and each process sets its values again every REFRESH_S: a series lives exactly as long as its actor (for the
driver's: until the run's `close()`), without gaps between the steps that change it.
"""

from __future__ import annotations

import threading
import time

import ray
from ray.util import metrics

_GAUGES = {
    "queue_depth": "rollout batches in flight: admitted and not yet trained (the step line's `in flight`)",
    "rollouts_per_s": "rollouts produced per second by a worker",
    "generated_tokens_per_s": "student tokens generated per second by a worker",
    "teacher_tokens_per_s": "tokens scored per second by a teacher replica",
    "learner_step_s": "seconds per learner optimiser step",
    "loss": "training loss",
    "kl": "forward KL to the teacher on the training states",
    "weight_version": "newest published weight version",
    "version_lag": "learner step minus the version that produced the rollout",
    "weight_publish_s": "seconds to publish one weight version",
    "pool_size": "actors that have joined the pool and not yet stopped",
    "pool_busy": "fraction of the last step the pool's actors were busy, averaged over its actors",
}
_TOTALS = {
    "rollouts_total": "rollouts produced",
    "staleness_drops_total": "rollouts dropped because they were too stale",
    "regenerated_total": "rollouts regenerated because they were too stale",
    "duplicates_discarded_total": "rollouts of a batch delivered again after it was trained or dropped",
    "retries_total": "requests retried after an actor died",
}
POOL_GAUGES = ("pool_size", "pool_busy")  # one series per pool, whichever process records it

TAG_KEYS = ("pool", "actor", "run")
POOL_TAG_KEYS = ("pool", "run")
REFRESH_S = 1.0  # well inside Ray's ~20 s expiry and a 5 s scrape interval

_live: set["Metrics"] = set()
_lock = threading.Lock()
_refresher: threading.Thread | None = None


def _refresh_forever() -> None:
    while True:
        time.sleep(REFRESH_S)
        with _lock:
            live = list(_live)
        for m in live:
            m.refresh()


def _start_refresher() -> None:
    global _refresher
    with _lock:
        if _refresher is None:
            _refresher = threading.Thread(target=_refresh_forever, daemon=True, name="ar2dlm-metrics")
            _refresher.start()


class Metrics:
    """Lazily created gauges; `set(name, value)` for a value, `inc(name, n)` for a running total. In an
    actor, `actor` defaults to the actor's own name (a restarted actor keeps it); `run` comes from the
    config, whose `logging.run_name` the driver fixes before it builds the pools. Exported until `close()`
    or the process ends."""

    def __init__(self, pool: str, run: str, actor: str | None = None):
        actor = actor or ray.get_runtime_context().get_actor_name() or pool
        self.tags = {"pool": pool, "actor": actor, "run": run}
        self.values: dict[str, float] = {}
        self._made: dict = {}
        _start_refresher()
        with _lock:
            _live.add(self)

    def _record(self, name: str, value: float) -> None:
        if name not in self._made:
            keys = POOL_TAG_KEYS if name in POOL_GAUGES else TAG_KEYS
            self._made[name] = (metrics.Gauge(f"ar2dlm_{name}", {**_GAUGES, **_TOTALS}[name], tag_keys=keys),
                                {k: self.tags[k] for k in keys})
        gauge, tags = self._made[name]
        gauge.set(value, tags=tags)

    def set(self, name: str, value) -> None:
        if value is not None:
            self._record(name, float(value))  # first: the refresher only sees gauges already made
            self.values[name] = float(value)

    def inc(self, name: str, n: float = 1) -> None:
        self.set(name, self.values.get(name, 0.0) + n)

    def refresh(self) -> None:
        for name, value in list(self.values.items()):
            self._record(name, value)

    def close(self) -> None:
        """Stop exporting these series (Ray drops them within about 20 s)."""
        with _lock:
            _live.discard(self)


METRIC_NAMES = [f"ar2dlm_{n}" for n in (*_GAUGES, *_TOTALS)]
