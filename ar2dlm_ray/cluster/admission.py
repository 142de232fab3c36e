"""Flow control of a Ray run as one pure object: when the driver may hand another rollout batch to the
producers, which weight version it must wait for, and whether a delivered batch is fresh enough to train.

A batch is submitted only when it will be trained at most `max_staleness` versions after the newest
published version, which it is told to wait for; so with `max_staleness: 0` rollout batch i is produced by
the weights after i steps, exactly as in the local trainer. At most `queue_size` batches wait ahead of the
learners beyond one in progress per producer (rollout worker or teacher replica), so a larger pool is
kept busy. Batches that still arrive too stale (after a retry, or with several workers) fail `fresh`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Admission:
    learners: int  # ranks of the learner group: each takes one batch per step
    publish_every: int
    max_staleness: int
    queue_size: int
    total_steps: int
    start_step: int = 0  # a resumed run starts here, with its weights published as that version
    producers: int = 0  # rollout workers + teacher replicas that score: each holds one batch in progress
    supplied: int = 0  # batches handed to producers
    demand: int = 0  # batches the started steps take (plus stale ones dropped)

    @classmethod
    def from_config(cls, cfg, total_steps: int, start_step: int = 0) -> "Admission":
        lc = cfg.learner
        return cls(lc.num_workers, lc.publish_every, lc.max_staleness, cfg.ray.queue_size, total_steps, start_step)

    @property
    def ahead(self) -> int:
        """Batches supplied beyond what the started steps take (negative: the current step still lacks some)."""
        return self.supplied - self.demand

    def published(self, step: int) -> int:
        """The newest version learner rank 0 has published (or is publishing) after `step` steps."""
        k = self.publish_every
        return max(self.start_step, step // k * k)

    def serving_step(self, step: int) -> int:
        """The step that will train the next batch submitted now."""
        return step if self.ahead < 0 else step + 1 + self.ahead // self.learners

    def step_started(self) -> None:
        """A step starts: every rank takes a new batch."""
        self.demand += self.learners

    def replace_dropped(self, batches: int) -> None:
        """Batches dropped as stale are consumed without training: as many more are needed."""
        self.demand += batches

    def admit(self, step: int) -> bool:
        """May another batch be submitted at `step`? Counts it as supplied when it may."""
        serving = self.serving_step(step)
        if (self.ahead >= self.queue_size + self.producers or serving >= self.total_steps
                or serving - self.published(step) > self.max_staleness):
            return False
        self.supplied += 1
        return True

    def fresh(self, step: int, version: int) -> bool:
        """May a batch produced by `version` be trained at `step`?"""
        return step - version <= self.max_staleness
