"""The driver of a Ray run: connects to (or starts) Ray, builds the pools from the config, feeds the
three stages, steps the learner group, and writes the same metrics, accounting, checkpoints and summary
as the local trainer (trainer.py), which is the reference it must agree with.

The stages: rollout workers -> `score-queue` -> teacher replicas -> `rollout-queue` -> learners. Each
stage works as soon as it has input, so the pools overlap. Flow control (admission.py): batch indices
go to the least-loaded rollout worker, each only when it will be trained at most `max_staleness`
versions after the weights it is told to wait for. Teacher replicas pull; a batch held by a replica
that dies goes back to `score-queue` (batch_queue.py). Delivery (delivery.py): each batch id is trained
at most once. Elastic pools (pools.py, controller.py, autoscale.py): between learner events the driver
applies resize requests, starting actors or draining them. Placement (placement.py): the pools are
reserved before any actor starts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch
from ray.exceptions import ActorDiedError, RayActorError

from ..config import ConfigError, RunConfig, RunError, StartupError, dump_config
from ..progress import Progress
from ..rollout import RECIPES
from ..runs import RunStorage, StopRequest, check_run_dir, checkpoint_due, flops, prepare_run_dir
from ..tracking import Tracker, run_name
from ..models import resolve_teacher_path
from .actors import LearnerWorker, RolloutWorker, TeacherServer
from .admission import Admission
from .autoscale import Autoscaler
from .batch_queue import BatchQueue
from .controller import CONTROLLER_NAME, PoolController
from .delivery import LEDGER_NAME, DeliveryLedger
from .messages import ACCOUNTED
from .metrics import Metrics
from .placement import reserve
from .pools import Member, Pool
from .weights import REGISTRY_NAME, WeightRegistry

QUEUE_NAME = "rollout-queue"
SCORE_QUEUE_NAME = "score-queue"
SHARED_ACTORS = (REGISTRY_NAME, LEDGER_NAME, QUEUE_NAME, SCORE_QUEUE_NAME, CONTROLLER_NAME)
UNBOUNDED = 1 << 30
PER_WORKER = 2  # rollout batches a worker holds: the one it rolls out and the next
PULL_WAIT_S = 0.5  # a teacher's empty poll: short, so direct calls queued behind it wait little
POLL_S = 1.0  # how often the driver looks for resize requests
ACCOUNTING_KEYS = ("prompts_consumed", "rolled_out", "scored", "trained_on", "dropped_stale", "discarded_duplicates",
                   "regenerated", "retried", "tokens_trained", "sampler_forwards", "generated_tokens")


def connect(cfg: RunConfig, log: Callable = print) -> bool:
    """Join the cluster named by `ray.address` / $RAY_ADDRESS (set inside `ray job submit`), else start
    an embedded local Ray with the dashboard on `ray.dashboard_host`. True when the Ray is embedded."""
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # No runtime_env here: inside `ray job submit` it would compete with the job's (working_dir); actors
    # set their own thread counts.
    if address:
        wait_until_reachable(address, cfg.ray.connect_timeout_s)
        ray.init(address=address, namespace=cfg.ray.namespace)
        log(f"[ray] connected to {address}")
        return False
    system = {"metrics_report_interval_ms": 1000}
    kwargs = {"_metrics_export_port": cfg.ray.metrics_export_port} if cfg.ray.metrics_export_port else {}
    ray.init(address="local", namespace=cfg.ray.namespace, num_cpus=cfg.ray.num_cpus,
             include_dashboard=cfg.ray.include_dashboard, dashboard_host=cfg.ray.dashboard_host,
             _system_config=system, **kwargs)
    ctx = ray.get_runtime_context()
    log(f"[ray] started an embedded Ray (dashboard: {getattr(ctx, 'dashboard_url', None) or 'off'})")
    return True


def wait_until_reachable(address: str, timeout_s: float) -> None:
    """Fail within `timeout_s` when nothing listens at a host:port Ray address (ray.init itself retries
    the GCS for minutes, printing only warnings)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address {address!r} is not host:port (or ray://host:port, auto)")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(f"cannot reach a Ray cluster at {address!r} within ray.connect_timeout_s="
                                  f"{timeout_s:g}s ({exc}); start one (`ray start --head`) or fix ray.address / "
                                  "RAY_ADDRESS") from None
            time.sleep(0.5)


@dataclass(frozen=True)
class Roles:
    """The actor classes of the three pools, and how the teacher is found: the orchestration benchmark swaps
    in subclasses whose compute is a stand-in."""

    teacher: type = TeacherServer
    rollout: type = RolloutWorker
    learner: type = LearnerWorker
    teacher_path: Callable = resolve_teacher_path


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


class RayTrainer:
    def __init__(self, cfg: RunConfig, log: Callable = print, roles: Roles = Roles()):
        self.cfg, self.log, self.roles = cfg, log, roles
        embedded = connect(cfg, log)
        self.reservation = reserve(cfg, embedded, log)  # before any actor starts; released by close()
        self.pools: dict[str, Pool] = {}
        try:
            self._start_pools(cfg)
        except BaseException:
            self.reservation.release()  # also ends the pool actors that did start
            for name in SHARED_ACTORS:  # outside the reservation
                if _exists(name):
                    ray.kill(ray.get_actor(name), no_restart=True)
            raise

    def _start_pools(self, cfg: RunConfig) -> None:
        self.teacher_path = self.roles.teacher_path(cfg, self.log)
        self.recipe = RECIPES[cfg.train.recipe]
        self.metrics = Metrics("driver", run_name(cfg), actor="driver")
        # Everything is named (dashboard, `ray.get_actor`); the pools die with the job.
        self.registry = ray.remote(WeightRegistry).options(name=REGISTRY_NAME, num_cpus=0).remote()
        self.ledger = ray.remote(DeliveryLedger).options(name=LEDGER_NAME, num_cpus=0).remote()
        # Admission bounds the batches in flight (they grow with the pools), so the queues need no bound of their own.
        self.queue = BatchQueue(UNBOUNDED, QUEUE_NAME)
        self.score_queue = BatchQueue(UNBOUNDED, SCORE_QUEUE_NAME)
        fixed = {"rollout": "learner.transport=collective broadcasts to a group fixed at start; use object_store "
                            "to resize it"} if cfg.learner.transport == "collective" else {}
        self.fixed = fixed
        self.controller = ray.remote(PoolController).options(name=CONTROLLER_NAME, num_cpus=0).remote(fixed)
        self.pools = {"teacher": Pool("teacher", self._start_teacher), "rollout": Pool("rollout", self._start_rollout)}
        self.placement: dict[str, list[dict]] = {}
        for kind, size in (("teacher", cfg.teacher.num_replicas), ("rollout", cfg.rollout.num_workers)):
            started, _ = self.pools[kind].resize(size)  # teachers first: rollout workers are told their names
            self.placement[kind] = _started([m.handle for m in started], [m.name for m in started])
            for member in started:
                self.pools[kind].activate(member.name)
        first = self.placement["rollout"][0]
        self.total_steps = cfg.train.max_steps or -(-first["num_prompts"] // cfg.train.rollout_batch_size)
        world = cfg.learner.num_workers
        placed = self.reservation.options
        self.learners = [ray.remote(self.roles.learner).options(**placed("learner", cfg.learner, f"learner-{r}")).remote(
            cfg, self.teacher_path, r, world, self.total_steps, self.queue, self.pools["rollout"].names())
            for r in range(world)]
        self.placement["learner"] = _started(self.learners, [f"learner-{r}" for r in range(world)])
        if world > 1:
            addr, port = ray.get(self.learners[0].rendezvous.remote(world))
            ray.get([lw.init_group.remote(addr, port) for lw in self.learners])
        if cfg.learner.transport == "collective":
            size = len(self.workers) + 1
            addr, port = ray.get(self.learners[0].rendezvous.remote(size))
            ray.get([self.learners[0].join_weights.remote(addr, port, 0, size)]
                    + [w.join_weights.remote(addr, port, i + 1, size) for i, w in enumerate(self.workers)])
        self.n_student = first["params"]
        self.n_teacher = self.placement["teacher"][0]["params"] or self.n_student
        self.block_size = first["block_size"]
        self.run_dir = RunStorage(cfg.train.out_dir)
        self.accounting = {k: 0 for k in ACCOUNTING_KEYS}
        self.step = self.start_batch = 0

    def _start_teacher(self, index: int, name: str):
        cfg = self.cfg
        return ray.remote(self.roles.teacher).options(**self.reservation.options("teacher", cfg.teacher.pool, name)).remote(
            cfg, self.teacher_path, self.score_queue, self.queue)

    def _start_rollout(self, index: int, name: str):
        cfg = self.cfg
        return ray.remote(self.roles.rollout).options(**self.reservation.options("rollout", cfg.rollout, name)).remote(
            cfg, self.teacher_path, index, self.pools["teacher"].names(), self.queue, self.score_queue)

    @property
    def workers(self) -> list:
        return [m.handle for m in self.pools["rollout"].live()]

    @property
    def teachers(self) -> list:
        return [m.handle for m in self.pools["teacher"].live()]

    # ---- flow control ------------------------------------------------------------------------------
    def _published(self) -> int:
        return self.admission.published(self.step)

    def _pump(self) -> None:
        """Everything the driver does for the producers between learner events."""
        self._apply_scaling()
        while self.admission.admit(self.step):
            self.unassigned.append((self.next_batch, 0, None))
            self.next_batch += 1
        self._assign()
        self._feed_teachers()

    def _assign(self) -> None:
        """Admitted batches to the least-loaded rollout workers: each holds at most one batch queued behind the
        one it is rolling out, so it starts the next as soon as it has handed the last one off."""
        now = time.monotonic()
        while self.unassigned:
            batch, attempt, avoid = self.unassigned[0]
            member = self.pools["rollout"].pick(now, avoid)
            if member is None or member.calls >= PER_WORKER:
                return
            self.unassigned.popleft()
            self._call(member, member.handle.produce.remote(batch, self._published()), "produce", batch, attempt)

    def _feed_teachers(self) -> None:
        """Each active teacher replica keeps one `pull` in flight: replicas take work as they free up, so a
        slow one holds back only its own batch, and a new one starts at once."""
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

    def _abandon_stalled(self) -> None:
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

    def _on_done(self, ref) -> None:
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
            self.busy_s["rollout"] += result.weights_s + result.rollout_s
        elif result is not None:  # a pull that scored a batch
            self.busy_s["teacher"] += result.teacher_s
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
                 f"draining {[m.name for m in draining]}")
        self._set_producers()
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

    def _set_producers(self) -> None:
        scorers = self.pools["teacher"].size if self.recipe.distill else 0
        self.admission.producers = self.pools["rollout"].size + scorers

    def _sizes(self) -> dict[str, int]:
        return {**{k: p.size for k, p in self.pools.items()}, "learner": len(self.learners)}

    def _report(self) -> None:
        sizes = self._sizes()
        for kind, n in sizes.items():
            Metrics(kind, run_name(self.cfg), actor="driver").set("pool_size", n)
        members = {k: [m.name for m in p.members.values() if m.state == "active"] for k, p in self.pools.items()}
        self.controller.report.remote({"sizes": sizes, "members": members, "events": self.events[-20:]})

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False, allow_change: tuple[str, ...] = ()) -> dict:
        cfg = self.cfg
        metrics_path, resumed = prepare_run_dir(self.run_dir, cfg, resume, overwrite, allow_change, self.log)
        if resumed:
            self._resume(*resumed)
        self.next_batch = self.start_batch
        self.admission = Admission.from_config(cfg, self.total_steps, start_step=self.step)
        self._set_producers()
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
        self.busy_s = {k: 0.0 for k in self.pools}
        self.busy_total = {"rollout": 0.0, "teacher": 0.0, "learner": 0.0, "actor_s": {k: 0.0 for k in self.pools}}
        self.window = _window(self.t_start)
        auto = cfg.ray.autoscale
        scalable = tuple(k for k in self.pools if k not in self.fixed)
        self.autoscaler = Autoscaler.from_config(auto, scalable) if auto.enabled else None
        self._report()
        ray.get(self.learners[0].publish.remote(self.step))
        self.log(f"[train] mode=ray recipe={cfg.train.recipe} steps={self.total_steps} "
                 f"pools: rollout={self.pools['rollout'].size} teacher={self.pools['teacher'].size} "
                 f"learner={len(self.learners)} student={self.n_student / 1e6:.2f}M params start_step={self.step}")
        max_batch = self.start_batch - 1
        progress = Progress(self.step, self.total_steps, self.accounting["tokens_trained"])
        tracker = Tracker(cfg, self.log)
        stop = StopRequest()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.admission.step_started()
            results = self._step_all()
            now = time.perf_counter()
            record = self._record(results, now - t0)
            max_batch = max([max_batch] + [r["produced"].batch for r in results])
            self.step += 1
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            tracker.log(self.step, record)
            if cfg.logging.progress and self.step % cfg.logging.log_every == 0:
                pools = " ".join(f"{k[0]}{n}" for k, n in record["pools"].items())
                self.log(progress.line(self.step, record["loss"], self.accounting["tokens_trained"],
                                       record["dropped_stale"] + record["discarded_duplicates"],
                                       f"version lag {record['version_lag']} queue {record['queue_depth']} "
                                       f"scoring {record['score_backlog']} pools {pools} "
                                       f"tokens {self.accounting['tokens_trained']} {record['step_s']:.1f}s"))
            if checkpoint_due(self.step, self.total_steps, cfg.train.checkpoint_every) or stop.requested:
                ckpt = self.checkpoint(max_batch + 1)
                if stop.requested:
                    raise stop.stopped(self.step, ckpt)
        stop.restore()
        tracker.close()
        self._finish_inflight()
        final = self.run_dir.location("final")
        ray.get(self.learners[0].save.remote(final))
        wall = max(time.monotonic() - self.t_start, 1e-9)
        left = self._drain_queue()  # before the accounting is copied: it counts them
        summary = {"final_student": final, "steps": self.step, "accounting": dict(self.accounting),
                   "placement": self.placement, "teacher_load": self.teacher_load,
                   "pools": {"sizes": self._sizes(), "events": self.events, "batches_delivered": self.work,
                             "busy": {"learner": self.busy_total["learner"] / wall,
                                      **{k: self.busy_total[k] / max(self.busy_total["actor_s"][k], 1e-9)
                                         for k in self.pools}}},
                   "delivery": {**ray.get(self.ledger.summary.remote()), "left_in_queue_ids": left},
                   "worker_deaths": self._named_deaths(),
                   **flops(self.accounting, self.n_teacher, self.n_student, self.block_size)}
        (self.run_dir.local / "summary.json").write_text(json.dumps(summary, indent=2))
        self.run_dir.persist(cfg.logging.metrics_file, "tensorboard", "summary.json")
        self.log(f"[train] done: {self.step} steps, {self.accounting['tokens_trained']} training tokens, "
                 f"accounting {json.dumps(self.accounting)}, student saved to {final}")
        return summary

    def _finish_inflight(self) -> None:
        """Calls in flight when training ends: their batches still count as rolled out (or scored), and end up
        in the queues (`left_in_queue_ids`); nothing is retried or scored any more."""
        deadline = time.monotonic() + min(60.0, self.cfg.ray.timeout_s)
        while (calls := [r for r, c in self.inflight.items() if c.kind != "start"]) and time.monotonic() < deadline:
            for ref in ray.wait(calls, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))[0]:
                try:
                    self._on_done(ref)
                except Exception:  # noqa: BLE001 - shutting down; nothing to retry
                    self.inflight.pop(ref, None)

    def _account(self, produced: list) -> None:
        """Add what producing (and scoring) these batches took to the run's accounting."""
        for stats in produced:
            for key in ACCOUNTED:
                self.accounting[key] += getattr(stats, key)

    def _drain_queue(self) -> list[int]:
        """Batch ids produced ahead and never consumed (each id once); they count as rolled out (and scored)."""
        left = []
        for queue in (self.queue, self.score_queue):
            while (item := queue.get_nowait()) is not None:
                left.append(item.stats)
        self._account(left)
        return sorted({stats.batch for stats in left})

    def _named_deaths(self) -> dict[str, int]:
        """Restarts seen per rollout worker: the processes that delivered for it, less the first."""
        return {name: len(pids) - 1 for name, pids in sorted(self.pids.items())}

    def _step_all(self) -> list[dict]:
        """One optimiser step on every learner rank, feeding the producers meanwhile."""
        self._pump()
        calls = {lw.train.remote(self.step, self._published()): rank for rank, lw in enumerate(self.learners)}
        # The queue depths recorded with this step, asked now so that the answers do not hold up its end.
        self.depths = [self.queue.actor.qsize.remote(), self.score_queue.actor.qsize.remote()]
        results: dict[int, dict] = {}
        deadline = time.monotonic() + self.cfg.ray.timeout_s
        while calls:
            if time.monotonic() > deadline:
                waiting = ", ".join(f"learner-{rank}" for rank in sorted(calls.values()))
                raise RunError(f"learner step {self.step + 1} did not finish within ray.timeout_s="
                               f"{self.cfg.ray.timeout_s:g}s ({waiting} still busy, {len(self.inflight)} producer "
                               "calls in flight)", resumable=True)
            self._abandon_stalled()
            ready, _ = ray.wait(list(calls) + list(self.inflight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in self.inflight:
                    self._on_done(ref)
                    continue
                rank = calls.pop(ref)
                try:
                    res = ray.get(ref)
                except RayActorError as exc:
                    raise RunError(f"learner-{rank} died at step {self.step + 1} ({type(exc).__name__}); the learner "
                                   "group cannot continue without it. The checkpoints in "
                                   f"{self.run_dir.location('checkpoints')} are intact", resumable=True) from None
                for key in ("dropped_stale", "discarded_duplicates", "regenerated", "retried"):
                    self.accounting[key] += res[key]
                self._account(res["consumed"])
                self.admission.replace_dropped(res["dropped_batches"])
                if res.get("starved"):
                    calls[self.learners[rank].train.remote(self.step, self._published())] = rank
                else:
                    results[rank] = res
            self._pump()
        return [results[r] for r in sorted(results)]

    def _record(self, results: list[dict], step_s: float) -> dict:
        cfg, acc = self.cfg, self.accounting
        for res in results:
            acc["trained_on"] += res["trained_on"]
            acc["tokens_trained"] += res["tokens_trained"]
        produced = [r["produced"] for r in results]
        n = len(results)
        loss = sum(r["loss"] for r in results) / n
        tokens = sum(r["tokens_trained"] for r in results)
        forwards = sum(p.sampler_forwards for p in produced)
        distill_kl = cfg.train.divergence == "forward_kl" and RECIPES[cfg.train.recipe].distill
        train_s = max(r["train_s"] for r in results)
        sizes = self._sizes()
        busy = {k: self.busy_s[k] / (step_s * max(1, sizes[k])) for k in self.pools}
        for k in self.pools:
            self.busy_total[k] += self.busy_s[k]
            self.busy_total["actor_s"][k] += step_s * sizes[k]
            self.window["busy"][k] += self.busy_s[k]
            self.busy_s[k] = 0.0
        self.busy_total["learner"] += train_s
        self.window["wait"] += max(0.0, step_s - train_s)
        for kind, fraction in busy.items():
            Metrics(kind, run_name(cfg), actor="driver").set("pool_busy", fraction)
        ready, scoring = ray.get(self.depths)
        self.metrics.set("queue_depth", ready)
        self.window["backlog"] += scoring
        self.window["steps"] += 1
        return {
            "step": self.step + 1, "batch": produced[0].batch, "batches": [p.batch for p in produced],
            "recipe": cfg.train.recipe, "loss": loss, "grad_norm": results[0]["grad_norm"], "lr": results[0]["lr"],
            "optimizer_steps": results[0]["optimizer_steps"], "updates": _mean_updates(results),
            "supervised_tokens": sum(r["supervised_tokens"] for r in results), "kl": loss if distill_kl else None,
            "gen_len_limit": produced[0].gen_len,
            "mean_gen_len": tokens / max(1, sum(r["trained_on"] for r in results)),
            "tokens_trained": acc["tokens_trained"], "tokens_per_forward": tokens / forwards if forwards else None,
            "version": min(p.version for p in produced), "version_lag": max(r["version_lag"] for r in results),
            "queue_depth": self.admission.ahead, "ready_depth": ready,
            "score_backlog": scoring, "pools": sizes,
            "busy": {**busy, "learner": train_s / step_s}, "rollout_s": max(p.rollout_s for p in produced),
            "teacher_s": max(p.teacher_s for p in produced), "train_s": train_s,
            "wait_s": max(r["wait_s"] for r in results), "publish_s": results[0]["publish_s"], "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "dropped_stale": acc["dropped_stale"], "discarded_duplicates": acc["discarded_duplicates"],
            "regenerated": acc["regenerated"], "retried": acc["retried"],
            **flops(acc, self.n_teacher, self.n_student, self.block_size),
        }

    # ---- checkpoints (the local trainer's format) ---------------------------------------------------
    def checkpoint(self, next_batch: int) -> str:
        state = {"step": self.step, "next_batch": next_batch, **ray.get(self.learners[0].state.remote()),
                 "rng": torch.get_rng_state(), "accounting": dict(self.accounting), "config": dump_config(self.cfg)}
        self.run_dir.persist(self.cfg.logging.metrics_file, "tensorboard")  # with a storage URI: the metrics up to here
        # Learner rank 0 writes the student on its own node: to the URI itself, or to a path every node mounts.
        return self.run_dir.write_checkpoint(self.step, lambda where: ray.get(self.learners[0].save.remote(where)),
                                         state, self.cfg.train.keep_checkpoints)

    def _resume(self, ckpt: Path, state: dict) -> None:
        # From a storage URI each learner downloads the student on its own node.
        student = self.run_dir.location(f"checkpoints/{ckpt.name}/student")
        ray.get([lw.load.remote(student, state) for lw in self.learners])
        self.step, self.start_batch = state["step"], state["next_batch"]
        self.accounting.update(state["accounting"])
        self.log(f"[train] resumed from {ckpt.name}: step {self.step}, next rollout batch {self.start_batch}")


    def close(self) -> None:
        """Stop the pools (they would die with a job's driver anyway, but not in a shared Ray)."""
        members = [m for pool in self.pools.values() for m in pool.members.values()]
        names = [*SHARED_ACTORS, *(m.name for m in members), *(f"learner-{r}" for r in range(len(self.learners)))]
        for actor in [*self.learners, *(m.handle for m in members), self.registry, self.ledger, self.queue.actor,
                      self.score_queue.actor, self.controller]:
            ray.kill(actor, no_restart=True)
        self.reservation.release()
        deadline = time.monotonic() + 30
        while names and time.monotonic() < deadline:  # names are released asynchronously
            names = [n for n in names if _exists(n)]
            time.sleep(0.05)


def _mean_updates(results: list[dict]) -> list[dict]:
    """Per optimiser step, over the learner ranks: mean loss, summed supervised tokens; the gradient norm and
    learning rate are the same on every rank (gradients are all-reduced before clipping)."""
    return [{"loss": sum(u["loss"] for u in ups) / len(ups), "grad_norm": ups[0]["grad_norm"], "lr": ups[0]["lr"],
             "supervised_tokens": sum(u["supervised_tokens"] for u in ups)}
            for ups in zip(*(r["updates"] for r in results))]


def _started(actors: list, names: list[str]) -> list[dict]:
    """Each actor's `info()`; an actor whose constructor failed (a teacher engine that cannot start, a
    model that cannot load) stops the run with its own error message rather than Ray's traceback."""
    try:
        return ray.get([a.info.remote() for a in actors])
    except RayActorError as exc:
        text = str(exc)
        # The last "[module.]SomeError: message" line of the remote traceback, without the module path.
        errors = list(re.finditer(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception): .*)$", text, flags=re.M))
        reason = text[errors[-1].start(1):] if errors else text
        name = next((n for n in names if n in text), "an actor")
        raise StartupError(f"{name} failed to start: {reason.strip()}") from None


def _exists(name: str) -> bool:
    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False


def train(cfg: RunConfig, resume: bool = False, log: Callable = print, overwrite: bool = False,
          allow_change: tuple[str, ...] = ()) -> dict:
    check_run_dir(cfg.train.out_dir, cfg.logging.metrics_file, resume, overwrite)  # before starting pools
    trainer = RayTrainer(cfg, log)
    try:
        return trainer.run(resume=resume, overwrite=overwrite, allow_change=allow_change)
    finally:
        trainer.close()
