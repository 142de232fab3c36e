"""The optional autoscaling policy (`ray.autoscale`): every `interval_s` it looks at the last interval and
moves one pool by one actor, within its [min, max].

- The learners waited for data more than `grow_above_wait` of the time: the producers are the bottleneck.
  Which one, the backlog says: when batches waited to be scored (on average at least half a batch per
  teacher replica), the teacher pool grows; otherwise the rollout workers are not keeping up, and they grow.
  (Busy fractions of two saturated pools differ by noise; a queue in front of a stage does not.)
- The learners hardly waited (< `shrink_below_wait`): a producer pool whose actors were busy less than
  `shrink_below_busy` of the time has more actors than the learners need, and shrinks.

Busy fractions are per actor (busy seconds / (actors x seconds)), so they compare pools of different sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Autoscaler:
    limits: dict[str, tuple[int, int]]  # pool -> (min, max)
    interval_s: float
    grow_above_wait: float = 0.10
    shrink_below_wait: float = 0.02
    shrink_below_busy: float = 0.5
    last: float | None = field(default=None)

    @classmethod
    def from_config(cls, auto, pools: tuple[str, ...]) -> "Autoscaler":
        return cls({p: tuple(getattr(auto, p)) for p in pools}, auto.interval_s, auto.grow_above_wait,
                   auto.shrink_below_wait, auto.shrink_below_busy)

    def due(self, now: float) -> bool:
        if self.last is None:
            self.last = now
        return now - self.last >= self.interval_s

    def decide(self, now: float, sizes: dict[str, int], busy: dict[str, float], learner_wait: float,
               score_backlog: float = 0.0) -> dict[str, int]:
        """New sizes for the pools that change ({} for none); call when `due`. `busy`: each producer pool's
        busy fraction over the interval, `learner_wait`: the learners' fraction of it spent waiting,
        `score_backlog`: the mean number of batches waiting for a teacher replica."""
        self.last = now
        pools = [p for p in self.limits if p in sizes]
        clamped = {p: min(max(sizes[p], self.limits[p][0]), self.limits[p][1]) for p in pools}
        changes = {p: n for p, n in clamped.items() if n != sizes[p]}
        if changes:
            return changes
        if learner_wait > self.grow_above_wait:
            teachers_behind = "teacher" in pools and score_backlog >= 0.5 * sizes["teacher"]
            pool = "teacher" if teachers_behind or "rollout" not in pools else "rollout"
            # At its maximum the bottleneck stays: growing the other pool would not help.
            return {pool: sizes[pool] + 1} if sizes[pool] < self.limits[pool][1] else {}
        if learner_wait < self.shrink_below_wait:
            idle = [p for p in pools if busy.get(p, 1.0) < self.shrink_below_busy and sizes[p] > self.limits[p][0]]
            if idle:
                pool = min(idle, key=lambda p: busy[p])
                return {pool: sizes[pool] - 1}
        return {}
