"""What the actors hand each other: a rollout batch (worker -> teacher -> learner, through the queues)
with what its production cost (worker -> driver) and what scoring it cost (teacher replica -> driver). Plain dataclasses, so that a field that one side renames fails loudly
instead of turning into a missing dict key somewhere else."""

from __future__ import annotations

from dataclasses import dataclass

from ..states import Rollout
from ..teacher import TokenTargets

# ProduceStats fields the driver adds into the run's accounting.
ACCOUNTED = ("prompts_consumed", "rolled_out", "scored", "sampler_forwards", "generated_tokens", "retried")


@dataclass
class ProduceStats:
    batch: int  # the rollout batch id (its prompts, seed and length limit)
    version: int  # the weight version that produced it
    worker: int
    pid: int  # the worker's process: a new one after each restart
    gen_len: int
    prompts_consumed: int
    rolled_out: int
    scored: int  # set by the teacher replica that scores it (or by the worker when it regenerates)
    sampler_forwards: int
    generated_tokens: int
    retried: int  # teacher calls retried on another replica
    weights_s: float
    rollout_s: float
    teacher_s: float


@dataclass
class ScoreStats:
    batch: int
    replica: str  # the teacher replica's name
    scored: int  # rollouts scored
    tokens: int
    teacher_s: float


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    targets: list[TokenTargets] | None  # None for the hard-label recipes
    stats: ProduceStats
