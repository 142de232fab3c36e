"""The driver of a Ray run: connects to (or starts) Ray, builds the pools from the config, feeds the
three stages, steps the learner group, and writes the same metrics, accounting, checkpoints and summary
as the local trainer (trainer.py), which is the reference it must agree with.

The stages: rollout workers -> `score-queue` -> teacher replicas -> `rollout-queue` -> learners. Each
stage works as soon as it has input, so the pools overlap. Flow control (admission.py): batch indices
go to the least-loaded rollout worker, each only when it will be trained at most `max_staleness`
versions after the weights it is told to wait for. Teacher replicas pull; a batch held by a replica
that dies goes back to `score-queue` (batch_queue.py). Delivery (delivery.py): each batch id is trained
at most once. The producer pools at work, their failures and resizing: producers.py. Placement
(placement.py): the pools are reserved before any actor starts.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch
from ray.exceptions import RayActorError

from ..config import ConfigError, RunConfig, RunError, StartupError, dump_config
from ..progress import Progress
from ..rollout import RECIPES
from ..runs import RunStorage, StopRequest, check_run_dir, checkpoint_due, flops, prepare_run_dir, sibling
from ..tracking import Tracker, run_name, saved_run_name
from ..models import resolve_teacher_path
from .actors import LearnerWorker, RolloutWorker, TeacherServer
from .address import wait_until_reachable
from .admission import Admission
from .batch_queue import BatchQueue
from .controller import CONTROLLER_NAME, PoolController
from .delivery import LEDGER_NAME, DeliveryLedger
from .job import submission_id
from .messages import ACCOUNTED
from .metrics import Metrics
from .nodes import (NodeWatch, absolute_out_dir, bundle_nodes, check_visible, dashboard_warning, loopback_only,
                    on_driver_node, settle)
from .placement import bundle, check_memory, reserve
from .producers import POLL_S, Producers
from .registry import REGISTRY_NAME, WeightRegistry

QUEUE_NAME = "rollout-queue"
SCORE_QUEUE_NAME = "score-queue"
SHARED_ACTORS = (REGISTRY_NAME, LEDGER_NAME, QUEUE_NAME, SCORE_QUEUE_NAME, CONTROLLER_NAME)
UNBOUNDED = 1 << 30
ACCOUNTING_KEYS = ("prompts_consumed", "rolled_out", "scored", "trained_on", "dropped_stale", "discarded_duplicates",
                   "regenerated", "retried", "tokens_trained", "sampler_forwards", "generated_tokens")


def namespace(cfg: RunConfig) -> str:
    """The run's own Ray namespace, so that jobs sharing a cluster never see each other's actors: `ray.namespace`,
    else `logging.run_name`, else the job's submission id (unique on its cluster), else the run name
    (<out_dir's name>-<start time>)."""
    return cfg.ray.namespace or cfg.logging.run_name or submission_id() or run_name(cfg)


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
        ray.init(address=address, namespace=namespace(cfg))
        log(f"[ray] connected to {address}; this run's actors are in Ray namespace {namespace(cfg)!r} "
            f"(`ar2dlm pools show --run {namespace(cfg)}`)")
        return False
    system = {"metrics_report_interval_ms": 1000}
    kwargs = {"_metrics_export_port": cfg.ray.metrics_export_port} if cfg.ray.metrics_export_port else {}
    with loopback_only():
        info = ray.init(address="local", namespace=namespace(cfg), num_cpus=cfg.ray.num_cpus,
                        include_dashboard=cfg.ray.include_dashboard, dashboard_host=cfg.ray.dashboard_host,
                        _system_config=system, **kwargs)
    port = info.dashboard_url.rpartition(":")[2] if info.dashboard_url else None
    log(f"[ray] started an embedded Ray: GCS {info.address_info['gcs_address']}, raylet, agents and actors listen "
        f"on 127.0.0.1 only; " + (f"dashboard on {cfg.ray.dashboard_host}:{port}" if port else "no dashboard"))
    if port and (warning := dashboard_warning(cfg.ray.dashboard_host)):
        log(warning)
    return True


@dataclass(frozen=True)
class Roles:
    """The actor classes of the three pools, and how the teacher is found: the orchestration benchmark swaps
    in subclasses whose compute is a stand-in."""

    teacher: type = TeacherServer
    rollout: type = RolloutWorker
    learner: type = LearnerWorker
    teacher_path: Callable = resolve_teacher_path


class RayTrainer:
    def __init__(self, cfg: RunConfig, log: Callable = print, roles: Roles = Roles(), resume: bool = False):
        """`resume`: the run in train.out_dir is to be resumed (`run(resume=True)`); its actors are tagged with
        the name it started with."""
        saved = saved_run_name(cfg) if resume else None  # before connect(), which may name the run
        embedded = connect(cfg, log)
        if saved:
            cfg.logging.run_name = saved
        cfg = absolute_out_dir(cfg, log)  # one run directory for the driver and every actor
        check_memory(cfg, log)  # what cannot fit is refused before any actor starts
        self.cfg, self.log, self.roles = cfg, log, roles
        self.nodes = NodeWatch()
        self.producers: Producers | None = None
        self.fixed = {"rollout": "learner.transport=collective broadcasts to a group fixed at start; use "
                                 "object_store to resize it"} if cfg.learner.transport == "collective" else {}
        self.controller = claim_namespace(self.fixed, {"rollout": bundle(cfg.rollout),
                                                       "teacher": bundle(cfg.teacher.pool)})
        try:
            self.reservation = reserve(cfg, embedded, log)  # before any actor starts; released by close()
            check_visible(cfg.train.out_dir, bundle_nodes(self.reservation.groups["learner"]), "the learners")
            self._start_pools(cfg)
        except BaseException:
            if hasattr(self, "reservation"):
                self.reservation.release()  # also ends the pool actors that did start
            _stop(self._shared())  # outside the reservation
            raise

    def _start_pools(self, cfg: RunConfig) -> None:
        self.teacher_path = self.roles.teacher_path(cfg, self.log)
        self.recipe = RECIPES[cfg.train.recipe]
        self.metrics = Metrics("driver", run_name(cfg), actor="driver")
        # Everything is named (dashboard, `ray.get_actor`); the pools die with the job. What every step needs
        # lives on the driver's node, so that losing another node never takes it.
        here = on_driver_node()
        self.registry = ray.remote(WeightRegistry).options(name=REGISTRY_NAME, num_cpus=0, **here).remote()
        self.ledger = ray.remote(DeliveryLedger).options(name=LEDGER_NAME, num_cpus=0, **here).remote()
        # Admission bounds the batches in flight (they grow with the pools), so the queues need no bound of their own.
        self.queue = BatchQueue(UNBOUNDED, QUEUE_NAME, options=here)
        self.score_queue = BatchQueue(UNBOUNDED, SCORE_QUEUE_NAME, options=here)
        self.accounting = {k: 0 for k in ACCOUNTING_KEYS}
        self.producers = Producers(cfg, self.log, self.recipe, {"teacher": self._start_teacher,
                                                                "rollout": self._start_rollout},
                                   self.reservation, self.score_queue, self.controller, self.fixed,
                                   cfg.learner.num_workers, self.accounting)
        self.producers.start()
        world = cfg.learner.num_workers
        placed = self.reservation.options
        self.learners = [ray.remote(self.roles.learner).options(**placed("learner", cfg.learner, f"learner-{r}")).remote(
            cfg, self.teacher_path, r, world, self.queue, self.producers.pools["rollout"].names())
            for r in range(world)]
        self.producers.started(_started)
        self.placement = self.producers.placement
        first = self.placement["rollout"][0]
        self.total_steps = cfg.train.max_steps or -(-first["num_prompts"] // cfg.train.rollout_batch_size)
        self.placement["learner"] = _started(self.learners, [f"learner-{r}" for r in range(world)])
        # A group of one too: the learner is sharded (FSDP2) at any size, one code path.
        addr, port = ray.get(self.learners[0].rendezvous.remote(world))
        ray.get([lw.init_group.remote(addr, port, self.total_steps) for lw in self.learners])
        if cfg.learner.transport == "collective":
            size = len(self.workers) + 1
            addr, port = ray.get(self.learners[0].rendezvous.remote(size))
            ray.get([self.learners[0].join_weights.remote(addr, port, 0, size)]
                    + [w.join_weights.remote(addr, port, i + 1, size) for i, w in enumerate(self.workers)])
        self.n_student = first["params"]
        self.n_teacher = self.placement["teacher"][0]["params"] or self.n_student
        self.block_size = first["block_size"]
        self.run_dir = RunStorage(cfg.train.out_dir)
        self.step = self.start_batch = 0

    def _start_teacher(self, index: int, name: str):
        cfg = self.cfg
        return ray.remote(self.roles.teacher).options(**self.reservation.options("teacher", cfg.teacher.pool, name)).remote(
            cfg, self.teacher_path, self.score_queue, self.queue)

    def _start_rollout(self, index: int, name: str):
        cfg = self.cfg
        return ray.remote(self.roles.rollout).options(**self.reservation.options("rollout", cfg.rollout, name)).remote(
            cfg, self.teacher_path, index, self.producers.pools["teacher"].names(), self.queue, self.score_queue)

    def _shared(self) -> dict:
        """The run's actors outside the pools that this driver has created so far, by name. Clean-up kills these
        by handle: an actor looked up by name could be another job's."""
        made = {CONTROLLER_NAME: self.controller, REGISTRY_NAME: getattr(self, "registry", None),
                LEDGER_NAME: getattr(self, "ledger", None)}
        made.update({name: getattr(self, attr).actor for attr, name in (("queue", QUEUE_NAME),
                                                                        ("score_queue", SCORE_QUEUE_NAME))
                     if hasattr(self, attr)})
        return {name: actor for name, actor in made.items() if actor is not None}

    @property
    def workers(self) -> list:
        return [m.handle for m in self.producers.pools["rollout"].live()]

    @property
    def teachers(self) -> list:
        return [m.handle for m in self.producers.pools["teacher"].live()]

    def _published(self) -> int:
        return self.admission.published(self.step)

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False, allow_change: tuple[str, ...] = ()) -> dict:
        cfg = self.cfg
        metrics_path, resumed = prepare_run_dir(self.run_dir, cfg, resume, overwrite, allow_change, self.log)
        if resumed:
            self._resume(*resumed)
        self.admission = Admission.from_config(cfg, self.total_steps, start_step=self.step)
        self.producers.begin(self.admission, self.start_batch, self.step)
        self.on_learners("publish", self.step)
        self.log(f"[train] mode=ray recipe={cfg.train.recipe} steps={self.total_steps} "
                 f"pools: rollout={self.producers.pools['rollout'].size} teacher={self.producers.pools['teacher'].size} "
                 f"learner={len(self.learners)} student={self.n_student / 1e6:.2f}M params start_step={self.step}")
        max_batch = self.start_batch - 1
        progress = Progress(self.step, self.total_steps, self.accounting["tokens_trained"])
        self.drops = shown = self.accounting["dropped_stale"] + self.accounting["discarded_duplicates"]
        tracker = Tracker(cfg, self.log)
        stop = StopRequest()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.admission.step_started()
            with self.nodes.explaining(self.placement):
                results = self._step_all()
            self.nodes.report_new(self.placement, self.log)
            now = time.perf_counter()
            record = self._record(results, now - t0)
            self.metrics.set("queue_depth", record["queue_depth"])  # the gauge is what the step line shows
            max_batch = max([max_batch] + [r["produced"].batch for r in results])
            self.step += 1
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            tracker.log(self.step, record)
            if cfg.logging.progress and self.step % cfg.logging.log_every == 0:
                pools = " ".join(f"{k[0]}{n}" for k, n in record["pools"].items())
                self.log(progress.line(self.step, record["loss"], self.accounting["tokens_trained"],
                                       self.drops,
                                       f"version lag {record['version_lag']} in flight {record['queue_depth']} "
                                       f"scoring {record['score_backlog']} pools {pools} "
                                       f"tokens {self.accounting['tokens_trained']} {record['step_s']:.1f}s",
                                       step_drops=self.drops - shown))
                shown = self.drops
            if checkpoint_due(self.step, self.total_steps, cfg.train.checkpoint_every) or stop.requested:
                with self.nodes.explaining(self.placement, self.learners[0], f"learner-0 failed writing the checkpoint "
                                           f"of step {self.step}; the checkpoints before it are intact"):
                    ckpt = self.checkpoint(max_batch + 1)
                if stop.requested:
                    raise stop.stopped(self.step, ckpt)
        stop.restore()
        tracker.close()
        self.producers.finish()
        final = self.run_dir.location("final")
        self.on_learners("save", final)
        left = self._drain_queue()  # before the accounting is copied: it counts them
        summary = {"final_student": final, "steps": self.step, "accounting": dict(self.accounting),
                   "placement": self.placement, "teacher_load": self.producers.teacher_load,
                   "pools": self.producers.summary(),
                   "delivery": {**ray.get(self.ledger.summary.remote()), "left_in_queue_ids": left},
                   "worker_deaths": self.producers.deaths(),
                   **flops(self.accounting, self.n_teacher, self.n_student, self.block_size)}
        (self.run_dir.local / "summary.json").write_text(json.dumps(summary, indent=2))
        self.run_dir.persist(cfg.logging.metrics_file, "tensorboard", "summary.json")
        self.log(f"[train] done: {self.step} steps, {self.accounting['tokens_trained']} training tokens, "
                 f"accounting {json.dumps(self.accounting)}, student saved to {final}")
        return summary

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

    def _step_all(self) -> list[dict]:
        """One optimiser step on every learner rank, feeding the producers meanwhile."""
        self.producers.pump(self.step)
        calls = {self._train(lw): rank for rank, lw in enumerate(self.learners)}
        # The queue depths recorded with this step, asked now so that the answers do not hold up its end.
        self.depths = [self.queue.actor.qsize.remote(), self.score_queue.actor.qsize.remote()]
        results: dict[int, dict] = {}
        deadline = time.monotonic() + self.cfg.ray.timeout_s
        while calls:
            if time.monotonic() > deadline:
                waiting = ", ".join(f"learner-{rank}" for rank in sorted(calls.values()))
                raise RunError(f"learner step {self.step + 1} did not finish within ray.timeout_s="
                               f"{self.cfg.ray.timeout_s:g}s ({waiting} still busy, {len(self.producers.inflight)} producer "
                               "calls in flight)", resumable=True)
            self.producers.abandon_stalled()
            ready, _ = ray.wait(list(calls) + list(self.producers.inflight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in self.producers.inflight:
                    self.producers.on_done(ref)
                    continue
                rank = calls.pop(ref)
                try:
                    res = ray.get(ref)
                except RayActorError as exc:
                    settle(self.learners[rank])  # if its node is lost, Ray says so before the run does
                    raise RunError(f"learner-{rank} failed at step {self.step + 1} ({type(exc).__name__}); the learner "
                                   "group cannot continue without it. The checkpoints in "
                                   f"{self.run_dir.location('checkpoints')} are intact", resumable=True) from None
                for key in ("dropped_stale", "discarded_duplicates", "regenerated", "retried"):
                    self.accounting[key] += res[key]
                self._account(res["consumed"])
                self.admission.replace_dropped(res["dropped_batches"])
                if res.get("starved"):
                    calls[self._train(self.learners[rank])] = rank
                else:
                    results[rank] = res
            self.producers.pump(self.step)
        return [results[r] for r in sorted(results)]

    def _drops_step(self) -> int:
        """Rollouts dropped as stale or discarded as duplicates since the last step."""
        before, self.drops = self.drops, self.accounting["dropped_stale"] + self.accounting["discarded_duplicates"]
        return self.drops - before

    def _train(self, learner):
        return learner.train.remote(self.step, self._published(), self.admission.bound(self.step))

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
        ready, scoring = ray.get(self.depths)
        busy = self.producers.step_done(step_s, train_s, scoring)
        return {
            "step": self.step + 1, "batch": produced[0].batch, "batches": [p.batch for p in produced],
            "recipe": cfg.train.recipe, "loss": loss, "grad_norm": results[0]["grad_norm"], "lr": results[0]["lr"],
            "optimizer_steps": results[0]["optimizer_steps"], "updates": _mean_updates(results),
            "supervised_tokens": sum(r["supervised_tokens"] for r in results), "kl": loss if distill_kl else None,
            "gen_len_limit": produced[0].gen_len,
            "mean_gen_len": tokens / max(1, sum(r["trained_on"] for r in results)),
            "tokens_trained": acc["tokens_trained"], "tokens_per_forward": tokens / forwards if forwards else None,
            "version": min(p.version for p in produced), "version_lag": max(r["version_lag"] for r in results),
            "queue_depth": self.admission.ahead,
            "staleness_bound": self.admission.staleness, "ready_depth": ready,
            "score_backlog": scoring, "pools": self.producers.joined(),
            "busy": {**busy, "learner": sum(min(r["train_s"], step_s) for r in results) / (n * step_s)},
            "rollout_s": max(p.rollout_s for p in produced),
            "teacher_s": max(p.teacher_s for p in produced), "train_s": train_s,
            "wait_s": max(r["wait_s"] for r in results), "publish_s": results[0]["publish_s"], "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "dropped_stale": acc["dropped_stale"], "discarded_duplicates": acc["discarded_duplicates"],
            "drops_step": self._drops_step(), "regenerated": acc["regenerated"], "retried": acc["retried"],
            **flops(acc, self.n_teacher, self.n_student, self.block_size),
        }

    # ---- checkpoints (the local trainer's format) ---------------------------------------------------
    def checkpoint(self, next_batch: int) -> str:
        state = {"step": self.step, "next_batch": next_batch, **ray.get(self.learners[0].state.remote()),
                 "rng": torch.get_rng_state(), "accounting": dict(self.accounting), "config": dump_config(self.cfg),
                 "delivery": ray.get(self.ledger.snapshot.remote(next_batch))}
        self.run_dir.persist(self.cfg.logging.metrics_file, "tensorboard")  # with a storage URI: the metrics up to here
        # The learners write on their own nodes (rank 0 the student, every rank its shards): to the URI itself,
        # or to a path every node mounts.
        return self.run_dir.write_checkpoint(
            self.step, lambda where: self.on_learners("save_checkpoint", where, sibling(where, "learner")),
            state, self.cfg.train.keep_checkpoints)

    def on_learners(self, method: str, *args):
        """Call every learner (gathering the shards is a collective of the group); rank 0's answer."""
        return ray.get([getattr(lw, method).remote(*args) for lw in self.learners])[0]

    def _resume(self, ckpt: Path, state: dict) -> None:
        # Each learner reads the shards on its own node (from a storage URI: downloads them), on any number of
        # learners: torch.distributed.checkpoint reshards.
        shards = self.run_dir.location(f"checkpoints/{ckpt.name}/learner")
        ray.get([lw.load.remote(shards, state) for lw in self.learners])
        self.step, self.start_batch = state["step"], state["next_batch"]
        self.accounting.update(state["accounting"])
        ray.get(self.ledger.restore.remote(state.get("delivery", {})))  # summary.json counts the whole run
        self.log(f"[train] resumed from {ckpt.name}: step {self.step}, next rollout batch {self.start_batch}")


    def close(self) -> None:
        """Stop the pools (they would die with a job's driver anyway, but not in a shared Ray)."""
        members = self.producers.members() if self.producers else []
        if self.producers:
            self.producers.close_metrics()
            self.metrics.close()
        self.reservation.release()
        _stop({**self._shared(), **{m.name: m.handle for m in members},
               **{f"learner-{r}": lw for r, lw in enumerate(self.learners)}})


def _mean_updates(results: list[dict]) -> list[dict]:
    """Per optimiser step, over the learner ranks: mean loss, summed supervised tokens; the gradient norm and
    learning rate are the same on every rank (gradients are all-reduced before clipping)."""
    return [{"loss": sum(u["loss"] for u in ups) / len(ups), "grad_norm": ups[0]["grad_norm"], "lr": ups[0]["lr"],
             "supervised_tokens": sum(u["supervised_tokens"] for u in ups)}
            for ups in zip(*(r["updates"] for r in results))]


def _stop(actors: dict) -> None:
    """Kill these actors (by handle) and wait until their names are free again: Ray releases them
    asynchronously, and the next run in this namespace (a resume in the same process) needs them."""
    for actor in actors.values():
        ray.kill(actor, no_restart=True)
    names, deadline = list(actors), time.monotonic() + 30
    while names and time.monotonic() < deadline:
        names = [n for n in names if _exists(n)]
        time.sleep(0.05)


def claim_namespace(fixed: dict[str, str], bundles: dict[str, dict]):
    """The pool controller, the run's first named actor: creating it claims the namespace, so a second job in
    the same namespace is refused here, in one line, before it reserves or starts anything."""
    try:
        return ray.remote(PoolController).options(name=CONTROLLER_NAME, num_cpus=0, **on_driver_node()).remote(
            fixed, bundles)
    except ValueError:  # ActorAlreadyExistsError
        space = ray.get_runtime_context().namespace
        raise ConfigError(f"{_holder(space)} already runs in Ray namespace {space!r} on this cluster; give this run "
                          f"a name of its own: logging.run_name=<name> (or ray.namespace=<name>)") from None


def _holder(space: str) -> str:
    """The job whose pool controller holds `space`, as the state API names it (read only, never touched)."""
    try:
        from ray.util.state import list_actors, list_jobs

        gcs = ray.get_runtime_context().gcs_address
        # Not only ALIVE: a run starting at the same moment holds the name before its controller is up.
        actor = list_actors(gcs, filters=[("name", "=", CONTROLLER_NAME), ("ray_namespace", "=", space),
                                          ("state", "!=", "DEAD")], timeout=10)[0]
        job = next(j for j in list_jobs(gcs, timeout=10) if j.job_id == actor.job_id)
        meta = job.metadata or {}
        parts = [f"submission {job.submission_id}" if job.submission_id else f"driver pid {job.driver_info.pid}",
                 f"run {meta.get('run_name') or space}", *([f"config {meta['config']}"] if "config" in meta else [])]
        return f"job {actor.job_id} ({', '.join(parts)})"
    except Exception:  # noqa: BLE001 - no dashboard to ask: the namespace alone names it
        return "another job"


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
          allow_change: tuple[str, ...] = (), resume_hint: str | None = None) -> dict:
    check_run_dir(cfg.train.out_dir, cfg.logging.metrics_file, resume, overwrite)  # before starting pools
    trainer = RayTrainer(cfg, log, resume=resume)
    if resume_hint:  # a lost driver (its node, an OOM kill) says nothing: the command is in the log from the start
        log(f"[train] should this driver be lost, continue the run from its last checkpoint with: {resume_hint}")
    try:
        return trainer.run(resume=resume, overwrite=overwrite, allow_change=allow_change)
    finally:
        trainer.close()
