"""The producer pools at work, for the driver: rollout workers and teacher replicas as elastic pools
(pools.py), the calls in flight on them, their failures and stalls, resizing (from the pool controller
or the autoscaling policy), and what each pool did (busy time, batches, resize events).

Between learner events the driver calls `pump(step)`: resize requests are applied, admitted batches go
to the least-loaded rollout workers (each holds at most one batch queued behind the one it rolls out,
so it starts the next as soon as it has handed the last one off), and each active teacher replica keeps
one `pull` in flight. Every answer goes to `on_done(ref)`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, RayActorError

from ..config import RunConfig, RunError
from ..tracking import run_name
from .autoscale import Autoscaler
from .metrics import Metrics
from .pools import Member, Pool, busy_seconds

PER_WORKER = 2  # rollout batches a worker holds: the one it rolls out and the next
PULL_WAIT_S = 0.5  # a teacher's empty poll: short, so direct calls queued behind it wait little
POLL_S = 1.0  # how often the driver looks for resize requests


@dataclass
class Call:
    """A producer call in flight: what it is for, and on which member."""

    kind: str  # produce | pull | start
    member: Member
    batch: int | None = None
    attempt: int = 0


def _window(now: float) -> dict:
    """What the autoscaler judges since `now`: busy seconds per producer pool, the learners' waiting seconds,
    and the batches waiting to be scored (summed over steps)."""
    return {"since": now, "busy": {"rollout": 0.0, "teacher": 0.0}, "wait": 0.0, "backlog": 0, "steps": 0}


class Producers:
    def __init__(self, cfg: RunConfig, log: Callable, recipe, start: dict[str, Callable], reservation, score_queue,
                 controller, fixed: dict[str, str], learners: int, accounting: dict):
        self.cfg, self.log, self.recipe = cfg, log, recipe
        self.reservation, self.score_queue, self.controller = reservation, score_queue, controller
        self.fixed, self.learners, self.accounting = fixed, learners, accounting
        self.metrics = Metrics("driver", run_name(cfg), actor="driver")
        self.pool_metrics = {k: Metrics(k, run_name(cfg)) for k in ("teacher", "rollout", "learner")}
        # Teachers first: rollout workers are told the teachers' names.
        self.pools = {"teacher": Pool("teacher", start["teacher"]), "rollout": Pool("rollout", start["rollout"])}
        self.placement: dict[str, list[dict]] = {}

    def start(self) -> None:
        """The pools at their configured sizes, every actor constructing at once (`started` waits for them):
        each one's imports and model load overlap the others' (and the learners')."""
        self.starting = {kind: self.pools[kind].resize(size)[0]
                         for kind, size in (("teacher", self.cfg.teacher.num_replicas),
                                            ("rollout", self.cfg.rollout.num_workers))}

    def started(self, started: Callable[[list, list[str]], list[dict]]) -> None:
        """Wait until every actor `start` began is up (`started` returns their info)."""
        for kind, members in self.starting.items():
            self.placement[kind] = started([m.handle for m in members], [m.name for m in members])
            for member in members:
                self.pools[kind].activate(member.name)

    def begin(self, admission, next_batch: int, step: int) -> None:
        """A run starts (or resumes) at `step`, producing from batch `next_batch`."""
        self.admission, self.next_batch, self.step = admission, next_batch, step
        self.log(f"[ray] {self._set_producers()}")
        self.inflight: dict = {}
        self.unassigned: deque = deque()  # (batch, attempt, worker to avoid): admitted, not yet with a worker
        self.failures: dict[str, int] = {}
        # Ray restarts a dead actor up to its pool's max_restarts times; each new process has a new pid.
        self.pids = {m.name: {info["pid"]} for m, info in zip(self.pools["rollout"].live(), self.placement["rollout"])}
        self.stalled: set[str] = set()
        self.teacher_load: dict[str, dict] = {}
        self.work: dict[str, int] = {}  # batches each producer delivered
        self.events: list[dict] = []
        self.t_start = self.next_poll = time.monotonic()
        self.spans: dict[str, dict[str, list]] = {k: {} for k in self.pools}  # busy spans per actor since the last step
        self.counted: dict[str, float] = {}  # per actor: busy time up to here is counted
        self.busy_total = {"rollout": 0.0, "teacher": 0.0, "learner": 0.0, "actor_s": {k: 0.0 for k in self.pools}}
        self.window = _window(self.t_start)
        scalable = tuple(k for k in self.pools if k not in self.fixed)
        auto = self.cfg.ray.autoscale
        self.autoscaler = Autoscaler.from_config(auto, scalable) if auto.enabled else None
        self._report()

    def published(self) -> int:
        return self.admission.published(self.step)

    # ---- feeding the pools ------------------------------------------------------------------------
    def pump(self, step: int) -> None:
        """Everything the driver does for the producers between learner events, at learner step `step`."""
        self.step = step
        self._apply_scaling()
        while self.admission.admit(step):
            self.unassigned.append((self.next_batch, 0, None))
            self.next_batch += 1
        self._assign()
        self._feed_teachers()

    def _assign(self) -> None:
        now = time.monotonic()
        while self.unassigned:
            batch, attempt, avoid = self.unassigned[0]
            member = self.pools["rollout"].pick(now, avoid)
            if member is None or member.calls >= PER_WORKER:
                return
            self.unassigned.popleft()
            self._call(member, member.handle.produce.remote(batch, self.published()), "produce", batch, attempt)

    def _feed_teachers(self) -> None:
        """Replicas take work as they free up, so a slow one holds back only its own batch, and a new one starts
        at once."""
        if not self.recipe.distill:
            return
        now = time.monotonic()
        for member in self.pools["teacher"].members.values():
            if member.state == "active" and member.calls == 0 and member.not_before <= now:
                self._call(member, member.handle.pull.remote(member.name, PULL_WAIT_S), "pull")

    def _call(self, member: Member, ref, kind: str, batch: int | None = None, attempt: int = 0) -> None:
        if member.calls == 0:
            member.since = time.monotonic()
        member.calls += 1
        self.inflight[ref] = Call(kind, member, batch, attempt)

    def abandon_stalled(self) -> None:
        """A member whose call has run past its pool's deadline (a hung process): restart it; its calls then
        fail, and their batches are redone elsewhere."""
        now = time.monotonic()
        limits = {"rollout": self.cfg.rollout.call_timeout_s, "teacher": PULL_WAIT_S + self.cfg.teacher.call_timeout_s}
        for kind, pool in self.pools.items():
            for member in pool.members.values():
                if member.calls and now - member.since > limits[kind] and member.name not in self.stalled:
                    self.stalled.add(member.name)
                    batches = sorted(c.batch for c in self.inflight.values() if c.member is member and c.batch is not None)
                    what = f"delivered batch {batches[0]}" if batches else "finished scoring"
                    budget = limits[kind] - (PULL_WAIT_S if kind == "teacher" else 0)
                    self.log(f"[ray] {member.name} has not {what} within {kind}.call_timeout_s={budget:g}s; "
                             "restarting it")
                    ray.kill(member.handle, no_restart=False)

    def on_done(self, ref) -> None:
        call = self.inflight.pop(ref)
        member, now = call.member, time.monotonic()
        if call.kind == "start":
            return self._on_started(member, ref)
        member.calls -= 1
        member.since = now
        try:
            result = ray.get(ref)
        except RayActorError as exc:
            return self._on_failed(call, exc)
        self.stalled.discard(member.name)
        if result is not None:
            self.work[member.name] = self.work.get(member.name, 0) + 1
        # The accounting counts batches when they reach the learners (or are left queued at the end), not here:
        # a checkpoint then counts exactly the batches before it, however late these answers arrive.
        if call.kind == "produce":
            self.pids[member.name].add(result.pid)
            self._busy("rollout", member.name, now - result.weights_s - result.rollout_s, now)
        elif result is not None:  # a pull that scored a batch
            self._busy("teacher", member.name, now - result.teacher_s, now)
            load = self.teacher_load.setdefault(member.name, {"batches": 0, "sequences": 0, "tokens": 0})
            load["batches"] += 1
            load["sequences"] += result.scored
            load["tokens"] += result.tokens

    def _on_failed(self, call: Call, exc: RayActorError) -> None:
        """A member died (or is restarting) with a call in flight: Ray restarts it and its work is redone; if
        the lost call had already delivered, the learners discard the second copy."""
        member = call.member
        if isinstance(exc, ActorDiedError) and member.state != "draining":  # restarting actors: ActorUnavailableError
            budget = (self.cfg.rollout if call.kind == "produce" else self.cfg.teacher.pool).max_restarts
            pool = "rollout" if call.kind == "produce" else "teacher.pool"
            raise RunError(f"{member.name} died and is out of restarts ({pool}.max_restarts={budget}); see why in its "
                           f"log (`ray logs actor --id {member.handle._actor_id.hex()}`) or raise the budget "
                           "(-1: unlimited)", resumable=True) from None
        attempt = self.failures[member.name] = self.failures.get(member.name, 0) + 1
        member.not_before = time.monotonic() + min(5.0, 0.25 * 2 ** min(attempt, 4))  # a restarting actor refuses work
        self.metrics.inc("retries_total")
        if call.kind == "produce":
            self.accounting["retried"] += 1
            self.log(f"[ray] rollout batch {call.batch} lost with {member.name} ({type(exc).__name__}); retrying")
            self.unassigned.appendleft((call.batch, call.attempt + 1, member.name))
        else:
            back = self.score_queue.release(member.name)
            self.accounting["retried"] += 1
            if back:
                self.log(f"[ray] {member.name} failed holding rollout batch(es) {back} ({type(exc).__name__}); "
                         "they wait for another replica")

    def _on_started(self, member: Member, ref) -> None:
        kind = member.name.rsplit("-", 1)[0]
        try:
            info = ray.get(ref)
        except RayActorError as exc:
            self.log(f"[ray] {member.name} failed to start ({type(exc).__name__}); left out of the pool")
            self.pools[kind].members.pop(member.name, None)
            self.reservation.release_actor(member.name)
            return self._report()
        if member.name in self.pools[kind].members:
            self.pools[kind].activate(member.name)
            self.placement[kind].append(info)
            self.pids[member.name] = {info["pid"]}
            self.log(f"[ray] {member.name} joined the {kind} pool")
            self.window = _window(time.monotonic())  # the autoscaler judges the pools as they are now, not ramping up
            self._report()

    # ---- elastic pools ------------------------------------------------------------------------------
    def _apply_scaling(self) -> None:
        now = time.monotonic()
        if now < self.next_poll:
            return
        self.next_poll = now + POLL_S
        self._retire()
        wanted, why = ray.get(self.controller.take.remote()), "requested"
        if (not wanted and self.autoscaler is not None and self.autoscaler.due(now)
                and now - self.window["since"] >= self.autoscaler.interval_s):
            span = max(now - self.window["since"], 1e-9)
            sizes = {k: max(1, p.size) for k, p in self.pools.items()}
            busy = {k: self.window["busy"][k] / (span * sizes[k]) for k in self.pools}
            backlog = self.window["backlog"] / max(1, self.window["steps"])
            wanted, why = self.autoscaler.decide(now, sizes, busy, self.window["wait"] / span, backlog), "autoscale"
            self.window = _window(now)
        for kind, size in wanted.items():
            self._resize(kind, size, why)

    def _resize(self, kind: str, size: int, why: str) -> None:
        pool = self.pools[kind]
        before = pool.size
        if size == before:
            return
        started, draining = pool.resize(size)
        for member in started:
            self.inflight[member.handle.info.remote()] = Call("start", member)
        self.events.append({"step": self.step, "time_s": round(time.monotonic() - self.t_start, 3), "pool": kind,
                            "from": before, "to": size, "why": why})
        self.log(f"[ray] {kind} pool {before} -> {size} ({why}): starting {[m.name for m in started]}, "
                 f"draining {[m.name for m in draining]}; {self._set_producers()}")
        self._retire()
        self._report()

    def _retire(self) -> None:
        """Stop drained members once their calls have returned (their batches are delivered by then)."""
        for kind, pool in self.pools.items():
            for member in pool.retire():
                ray.kill(member.handle, no_restart=True)
                self.reservation.release_actor(member.name)
                self.log(f"[ray] {member.name} drained and stopped")
                self._report()

    def _set_producers(self) -> str:
        """Admission follows the pool sizes; what it now allows, for the log."""
        scorers = self.pools["teacher"].size if self.recipe.distill else 0
        adm = self.admission
        adm.resize(self.pools["rollout"].size + scorers, self.step)
        bound = f"auto ({adm.staleness} now)" if adm.max_staleness is None else adm.staleness
        return (f"admission for {adm.producers} producers, {adm.learners} learner(s): "
                + (adm.shortfall() or f"learner.max_staleness={bound}"))

    def sizes(self) -> dict[str, int]:
        """The sizes asked for (a starting actor counts)."""
        return {**{k: p.size for k, p in self.pools.items()}, "learner": self.learners}

    def joined(self) -> dict[str, int]:
        """The actors that have joined each pool and not yet stopped (a draining one still delivers)."""
        return {**{k: sum(m.state != "starting" for m in p.members.values()) for k, p in self.pools.items()},
                "learner": self.learners}

    def _report(self) -> None:
        sizes = self.sizes()
        for kind, n in self.joined().items():
            self.pool_metrics[kind].set("pool_size", n)
        members = {k: [m.name for m in p.members.values() if m.state == "active"] for k, p in self.pools.items()}
        spare = {k: self.reservation.spare(k) for k in self.pools}
        self.controller.report.remote({"sizes": sizes, "members": members, "events": self.events[-20:], "spare": spare})

    # ---- what the pools did -----------------------------------------------------------------------
    def _busy(self, kind: str, name: str, start: float, end: float) -> None:
        self.spans[kind].setdefault(name, []).append((start, end))

    def _actor_busy(self, kind: str, start: float, end: float) -> list[float]:
        """Busy seconds in [start, end] of each actor of the pool that has joined it, or delivered and stopped."""
        pool, spans = self.pools[kind], self.spans[kind]
        self.spans[kind] = {}
        out = []
        for name in sorted(set(spans) | {m.name for m in pool.members.values() if m.state != "starting"}):
            member = pool.members.get(name)
            # A rollout worker works through its calls one after another: with one in flight it is busy. A
            # teacher's pull in flight may be waiting for work; its scoring counts once it returns.
            running = [(member.since, end)] if kind == "rollout" and member is not None and member.calls else []
            seconds, counted = busy_seconds(spans.get(name, []) + running, self.counted.pop(name, 0.0), start, end)
            if member is not None:
                self.counted[name] = counted
            out.append(seconds)
        return out

    def step_done(self, step_s: float, train_s: float, score_backlog: int) -> dict[str, float]:
        """A learner step took `step_s` (training `train_s` of it), ending now: each producer pool's busy
        fraction over it, the mean over its actors of the part of the step each was busy (so within [0, 1])."""
        end = time.monotonic()
        busy = {}
        for kind in self.pools:
            seconds = self._actor_busy(kind, end - step_s, end)
            busy[kind] = sum(seconds) / (step_s * len(seconds)) if seconds else 0.0
            self.busy_total[kind] += sum(seconds)
            self.busy_total["actor_s"][kind] += step_s * len(seconds)
            self.window["busy"][kind] += sum(seconds)
            self.pool_metrics[kind].set("pool_busy", busy[kind])
        self.busy_total["learner"] += train_s
        self.window["wait"] += max(0.0, step_s - train_s)
        self.window["backlog"] += score_backlog
        self.window["steps"] += 1
        return busy

    def finish(self) -> None:
        """Calls in flight when training ends: their batches end up in the queues (`left_in_queue_ids`);
        nothing is retried or scored any more."""
        deadline = time.monotonic() + min(60.0, self.cfg.ray.timeout_s)
        while (calls := [r for r, c in self.inflight.items() if c.kind != "start"]) and time.monotonic() < deadline:
            for ref in ray.wait(calls, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))[0]:
                try:
                    self.on_done(ref)
                except Exception:  # noqa: BLE001 - shutting down; nothing to retry
                    self.inflight.pop(ref, None)

    def summary(self) -> dict:
        """`summary.json`'s pools: sizes, resize events, batches per actor, busy fractions over the run."""
        wall = max(time.monotonic() - self.t_start, 1e-9)
        busy = {k: self.busy_total[k] / max(self.busy_total["actor_s"][k], 1e-9) for k in self.pools}
        return {"sizes": self.sizes(), "events": self.events, "batches_delivered": self.work,
                "busy": {"learner": self.busy_total["learner"] / wall, **busy}}

    def deaths(self) -> dict[str, int]:
        """Restarts seen per rollout worker: the processes that delivered for it, less the first."""
        return {name: len(pids) - 1 for name, pids in sorted(self.pids.items())}

    def members(self) -> list[Member]:
        return [m for pool in self.pools.values() for m in pool.members.values()]

    def close_metrics(self) -> None:
        """The run is over: the driver's series of its pools end."""
        for m in (self.metrics, *self.pool_metrics.values()):
            m.close()
