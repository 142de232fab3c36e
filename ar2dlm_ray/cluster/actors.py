"""The actors: thin shells around the core modules (rollout.py, teacher.py, learner.py).

- TeacherServer: a frozen teacher backend (`build_teacher`). `pull` leases the next unscored rollout batch
  from `score-queue`, scores it and delivers it to the learners' queue; `score` and `generate` answer
  direct calls (teacher-generated x0, regenerated batches).
- RolloutWorker: a student copy; `produce(batch_index, min_version)` adopts the newest weights (at least
  `min_version`), rolls out with the core sources and hands the batch to `score-queue` (or, for recipes
  without teacher targets, to the learners' queue); it is free for its next batch at once.
- LearnerWorker: one rank of the learner group (sharded with FSDP2 once the group exists, a group of one
  included); `train(step)` takes a rollout batch from the queue, checks its staleness and runs
  `Learner.train_step`. Publishing and checkpointing gather the shards, so every rank takes part; rank 0
  hands the weights to the transport and writes the student.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from ..config import RunError
from ..learner import Learner, is_sharded, shard
from ..rollout import RECIPES, X0Producer
from ..runs import local_dir, save_dir
from ..teacher import build_teacher
from ..models import build_student, param_count
from ..student import resolve_device
from .controller import current_members
from .delivery import LEDGER_NAME
from .messages import ProduceStats, RolloutBatch, ScoreStats
from .metrics import Metrics
from .registry import REGISTRY_NAME
from .rendezvous import host_store, join_store
from .weights import WeightSource, build_transport


def _setup_process(threads: int) -> None:
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # per-actor progress bars flood the job log


def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {"name": ctx.get_actor_name(), "node_id": ctx.get_node_id(), "pid": os.getpid()}


class TeacherServer:
    def __init__(self, cfg, teacher_path: str, inbox=None, outbox=None):
        _setup_process(cfg.ray.actor_threads)
        self.cfg, self.inbox, self.outbox = cfg, inbox, outbox
        self.backend = self.build_backend(cfg, teacher_path)
        self.metrics = Metrics("teacher", cfg.logging.run_name)
        self.served = {"score_calls": 0, "sequences": 0, "tokens": 0}

    def build_backend(self, cfg, teacher_path: str):
        """The teacher (a stand-in in the orchestration benchmark)."""
        return build_teacher(cfg, teacher_path)

    def info(self) -> dict:
        model = getattr(self.backend, "model", None)
        return {**_where(), "params": param_count(model) if model is not None else None,
                "backend": type(self.backend).__name__}

    def load(self) -> dict:
        """What this replica has scored (since its last start)."""
        return dict(self.served)

    def score(self, pairs):
        start = time.perf_counter()
        tokens = sum(len(p) + len(g) for p, g in pairs)
        self.served["score_calls"] += 1
        self.served["sequences"] += len(pairs)
        self.served["tokens"] += tokens
        out = self.backend.score(pairs)
        self.metrics.set("teacher_tokens_per_s", tokens / (time.perf_counter() - start))
        return out

    def generate(self, prompts, max_new_tokens: int, temperature: float, seed: int):
        return self.backend.generate(prompts, max_new_tokens, temperature, seed)

    def pull(self, holder: str, wait_s: float) -> ScoreStats | None:
        """Score the next batch waiting in the inbox and deliver it to the outbox; None when none came
        within `wait_s` (short, so that direct calls queued behind this one are not held up long). The batch
        is leased under `holder` until delivered: if this replica dies first, the driver puts it back."""
        item = self.inbox.get(wait_s, holder=holder)
        if item is None:
            return None
        start = time.perf_counter()
        item.targets = self.score([(r.prompt_ids, r.tokens) for r in item.rollouts])
        stats = item.stats
        stats.scored, stats.teacher_s = len(item.rollouts), time.perf_counter() - start
        self.outbox.put(item, timeout=self.cfg.ray.timeout_s)
        self.inbox.ack(holder, stats.batch)
        return ScoreStats(batch=stats.batch, replica=holder, scored=stats.scored, teacher_s=stats.teacher_s,
                          tokens=sum(len(r.prompt_ids) + len(r.tokens) for r in item.rollouts))


class RoundRobin:
    """A pool of interchangeable actors: calls go round-robin; a call whose actor died (or is restarting)
    is retried on the next one while Ray restarts it, and counted in `retries`. A call that takes longer than
    `call_timeout_s` is abandoned: its actor is named in the log and killed (Ray restarts it), and the call
    goes to the next one. The pool can be resized while a job runs: when every attempt failed, the client
    takes the pool's current members from the pool controller and tries once more."""

    def __init__(self, names: list[str], pool: str, start: int = 0, attempts: int = 8,
                 call_timeout_s: float | None = None):
        self.names, self.pool, self.next, self.attempts = names, pool, start, attempts
        self._handles: list | None = None  # looked up on first use
        self.call_timeout_s = call_timeout_s
        self.retries = 0

    @property
    def handles(self) -> list:
        if self._handles is None:
            try:
                self._handles = [ray.get_actor(n) for n in self.names]
            except ValueError:  # a member scaled away meanwhile: the caller refreshes the names
                raise RayActorError() from None
        return self._handles

    def _pick(self) -> int:
        index = self.next % len(self.handles)
        self.next += 1
        return index

    def _get(self, index: int, ref):
        """The call's result; RayActorError when its actor died or stalled past the deadline."""
        try:
            return ray.get(ref, timeout=self.call_timeout_s)
        except GetTimeoutError:
            print(f"[ray] {self.names[index]} did not answer within call_timeout_s={self.call_timeout_s:g}s; "
                  "restarting it and retrying the call on another", flush=True)
            ray.kill(self.handles[index], no_restart=False)
            raise RayActorError() from None

    def _call(self, method: str, *args, **kwargs):
        try:
            return self._attempts(method, *args, **kwargs)
        except RayActorError:
            names = current_members(self.pool)
            if not names or names == self.names:
                raise
            self.names, self._handles = names, None
            return self._attempts(method, *args, **kwargs)

    def _attempts(self, method: str, *args, **kwargs):
        for attempt in range(self.attempts):
            index = self._pick()
            try:
                return self._get(index, getattr(self.handles[index], method).remote(*args, **kwargs))
            except RayActorError:
                if attempt == self.attempts - 1:
                    raise
                self.retries += 1
                time.sleep(min(2.0, 0.1 * 2 ** attempt))


class TeacherClient(RoundRobin):
    """The teacher pool as one backend (`score`, `generate`) for the core rollout functions."""

    def score(self, pairs):
        """The batch split into one contiguous part per replica, scored concurrently, results in order."""
        if len(self.handles) < 2 or len(pairs) < 2:
            return self._call("score", pairs)
        size = -(-len(pairs) // min(len(self.handles), len(pairs)))
        parts = [pairs[lo:lo + size] for lo in range(0, len(pairs), size)]
        calls = []
        for part in parts:
            index = self._pick()
            calls.append((index, self.handles[index].score.remote(part)))
        out = []
        for part, (index, ref) in zip(parts, calls):
            try:
                out.extend(self._get(index, ref))
            except RayActorError:  # that replica died or stalled: this part goes through the retrying path
                self.retries += 1
                out.extend(self._call("score", part))
        return out

    def generate(self, prompts, max_new_tokens, temperature, seed):
        return self._call("generate", prompts, max_new_tokens, temperature, seed)


class RolloutWorker:
    def __init__(self, cfg, teacher_path: str, index: int, teacher_names: list[str], queue, score_queue):
        _setup_process(cfg.ray.actor_threads)
        self.cfg, self.index, self.queue, self.score_queue = cfg, index, queue, score_queue
        self.recipe = RECIPES[cfg.train.recipe]
        self.teacher = TeacherClient(teacher_names, "teacher", start=index, call_timeout_s=cfg.teacher.call_timeout_s)
        self.student, self.x0 = self.build_producer(cfg, teacher_path)
        self.transport = build_transport(cfg.learner.transport, ray.get_actor(REGISTRY_NAME))
        self.version = -1  # always adopt the learner's first publication, so both start from the same weights
        self.metrics = Metrics("rollout", cfg.logging.run_name)

    def build_producer(self, cfg, teacher_path: str):
        """The student copy and the producer of x0 (stand-ins in the orchestration benchmark)."""
        student = build_student(cfg, teacher_path)
        return student, X0Producer(cfg, student, self.teacher, teacher_path)

    def info(self) -> dict:
        return {**_where(), "num_prompts": len(self.x0.prompts), "params": param_count(self.student.model),
                "block_size": self.student.spec.block_size}

    def join_weights(self, addr: str, port: int, rank: int, world: int) -> None:
        """transport=collective: join the broadcast group (rank 0 is learner rank 0)."""
        self.transport.join(join_store(addr, port, world), rank, world, self.student.model)

    def produce(self, batch_index: int, min_version: int, to_queue: bool = True) -> ProduceStats | RolloutBatch:
        """Roll out batch `batch_index` with weights of at least `min_version` and hand it on (to be scored,
        or straight to the learners) and return its stats; or (`to_queue=False`: regeneration) score it here
        and return the batch itself."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.version = self.transport.receive(self.student.model, self.version, min_version, cfg.ray.timeout_s)
        t1 = time.perf_counter()
        x0 = self.x0.produce(batch_index, self.version)
        rollouts = x0.rollouts
        t2 = time.perf_counter()
        tokens = sum(len(r.tokens) for r in rollouts)
        stats = ProduceStats(batch=batch_index, version=self.version, worker=self.index, pid=os.getpid(),
                             gen_len=x0.gen_len, prompts_consumed=len(x0.indices), rolled_out=len(rollouts),
                             scored=0, sampler_forwards=x0.sampler_forwards, generated_tokens=tokens, retried=0,
                             weights_s=t1 - t0, rollout_s=t2 - t1, teacher_s=0.0)
        self.metrics.inc("rollouts_total", len(rollouts))
        self.metrics.set("rollouts_per_s", len(rollouts) / max(t2 - t1, 1e-9))
        self.metrics.set("generated_tokens_per_s", tokens / max(t2 - t1, 1e-9))
        item = RolloutBatch(rollouts, None, stats)
        if not to_queue:
            if self.recipe.distill:
                retries_before = self.teacher.retries
                item.targets = self.teacher.score([(r.prompt_ids, r.tokens) for r in rollouts])
                stats.scored, stats.teacher_s = len(rollouts), time.perf_counter() - t2
                stats.retried = self.teacher.retries - retries_before
                self.metrics.inc("retries_total", stats.retried)
            return item
        (self.score_queue if self.recipe.distill else self.queue).put(item, timeout=cfg.ray.timeout_s)
        return stats


STARVED_S = 2.0  # a learner waiting longer for a batch hands control back to the driver


class LearnerWorker:
    def __init__(self, cfg, teacher_path: str, rank: int, world: int, queue, worker_names: list[str]):
        _setup_process(cfg.ray.actor_threads)
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.rank, self.world, self.queue = cfg, rank, world, queue
        self.student = self.build_student(cfg, teacher_path)
        self.learner = None  # built by init_group: sharding needs the process group
        self.total_steps, self.prefetched = None, None  # set by init_group: the driver learns it from the data
        self.transport = build_transport(cfg.learner.transport, ray.get_actor(REGISTRY_NAME))
        self.ledger = ray.get_actor(LEDGER_NAME)
        self.workers = RoundRobin(worker_names, "rollout", start=rank, call_timeout_s=cfg.rollout.call_timeout_s)
        self.metrics = Metrics("learner", cfg.logging.run_name)
        self.stores: dict = {}  # port -> hosted store, until this rank joins its group

    def build_student(self, cfg, teacher_path: str):
        """The student in float32 on the CPU, to be sharded (a stand-in in the orchestration benchmark); in a
        group, only rank 0 reads the weights and the others build the architecture on the meta device."""
        model = cfg.model.model_copy(update={"dtype": "float32", "device": "cpu"})
        return build_student(cfg.model_copy(update={"model": model}), teacher_path, meta=self.rank > 0)

    def build_learner(self):
        """FSDP2 over the group: float32 shards (the master weights) on model.device, compute in model.dtype;
        rank 0 sends every other rank its shards."""
        shard(self.student, getattr(torch, self.cfg.model.dtype), str(resolve_device(self.cfg.model.device)),
              from_rank0=self.world > 1)
        return Learner(self.student, self.cfg, self.total_steps)

    def info(self) -> dict:
        return {**_where(), "params": param_count(self.student.model)}

    # ---- process group ----------------------------------------------------------------------------
    def rendezvous(self, world: int) -> tuple[str, int]:
        """Host the store of a new group of `world` processes (this actor is its rank 0); its address."""
        addr = ray.util.get_node_ip_address()
        store = host_store(addr, world)
        self.stores[store.port] = store
        return addr, store.port

    def _store(self, addr: str, port: int, rank: int, world: int):
        return self.stores.pop(port) if rank == 0 else join_store(addr, port, world)

    def init_group(self, addr: str, port: int, total_steps: int) -> None:
        import torch.distributed as dist

        self.total_steps = total_steps
        backend = self.cfg.learner.backend
        if backend == "auto":
            backend = "nccl" if resolve_device(self.cfg.model.device).type == "cuda" else "gloo"
        dist.init_process_group(backend, store=self._store(addr, port, self.rank, self.world), rank=self.rank,
                                world_size=self.world)
        # Every rank loaded the same student; each keeps its shard of it.
        self.learner = self.build_learner()

    def join_weights(self, addr: str, port: int, rank: int, world: int) -> None:
        self.transport.join(self._store(addr, port, rank, world), rank, world, self._weights())

    # ---- weights and checkpoints --------------------------------------------------------------------
    def _weights(self):
        """What the transport publishes: the model, or (sharded) its full weights gathered tensor by tensor."""
        model = self.student.model
        return WeightSource.gathered(model, self.student.dtype) if is_sharded(model) else model

    def publish(self, version: int) -> float | None:
        """Every rank takes part (the gathers are collectives); rank 0 publishes."""
        weights = self._weights()
        if self.rank != 0:
            WeightSource.drain(weights)
            return None
        seconds = self.transport.publish(weights, version)
        self.metrics.set("weight_version", version)
        self.metrics.set("weight_publish_s", seconds)
        return seconds

    def load(self, shards: str, state: dict) -> None:
        """A checkpoint's sharded learner state (its learner/ directory, written by `save_checkpoint` on any
        number of ranks: torch.distributed.checkpoint reshards it); `shards` is a path or a storage URI
        (downloaded on this node)."""
        import torch.distributed.checkpoint as dcp

        with local_dir(shards) as path:
            if not (Path(path) / ".metadata").is_file():
                raise RunError(f"{shards} holds no sharded learner state (.metadata): the checkpoint was written "
                               f"before the sharded learner; resume it with the version that wrote it")
            sharded = self.learner.sharded_state()
            dcp.load(sharded, checkpoint_id=str(path))
        self.learner.load_sharded_state(sharded)
        self.learner.load_state_dict(state)

    def save(self, out_dir: str) -> None:
        """The student as a Hugging Face directory; every rank gathers, rank 0 writes. `out_dir`: a path, or a
        storage URI (uploaded from this node, which may not be the driver's)."""
        weights = self._weights()
        if self.rank != 0:
            WeightSource.drain(weights)
            return
        state = weights.state_dict() if isinstance(weights, WeightSource) else None
        save_dir(out_dir, lambda path: self.student.save(path, state))

    def save_checkpoint(self, student: str, shards: str) -> None:
        """The student (rank 0) and the learner's shards: every rank's float32 parameter shards and AdamW state
        (torch.distributed.checkpoint, one file per rank, written in parallel). Paths or storage URIs."""
        import torch.distributed.checkpoint as dcp

        self.save(student)
        save_dir(shards, lambda path: dcp.save(self.learner.sharded_state(), checkpoint_id=str(path)), shared=True)

    def state(self) -> dict:
        return self.learner.state_dict()

    # ---- training ---------------------------------------------------------------------------------
    def _next_item(self, step: int, newest: int, staleness: int, counts: dict) -> dict | None:
        """A rollout batch at most `staleness` versions behind `step` (dropping or regenerating);
        None when the queue stays empty, so the driver can feed the producers and call again."""
        cfg = self.cfg.learner
        while True:
            item = self.queue.get(timeout=STARVED_S)
            if item is None:
                return None
            stats = item.stats
            n = len(item.rollouts)
            counts["consumed"].append(stats)
            fresh = step - stats.version <= staleness
            if not ray.get(self.ledger.claim.remote(stats.batch, "trained" if fresh or cfg.stale_policy ==
                                                     "regenerate" else "dropped")):
                # A second delivery of a batch already trained or dropped (its first producer died after
                # delivering, and the driver had it redone): train it at most once.
                counts["discarded_duplicates"] += n
                self.metrics.inc("duplicates_discarded_total", n)
                continue
            if fresh:
                return item
            if cfg.stale_policy == "drop":
                counts["dropped_stale"] += n
                counts["dropped_batches"] += 1
                self.metrics.inc("staleness_drops_total", n)
                continue
            # Regenerate the same batch (same prompts and seed) with the newest published weights.
            retries = self.workers.retries
            item = self.workers._call("produce", stats.batch, newest, to_queue=False)
            counts["regenerated"] += n
            counts["retried"] += self.workers.retries - retries
            counts["consumed"].append(item.stats)
            self.metrics.inc("regenerated_total", n)
            return item

    @staticmethod
    def _counts() -> dict:
        # "consumed": the stats of every batch taken from the queue (and of a regenerated one), for the run's
        # accounting: it counts what reached the learners, so a checkpoint counts exactly the batches before it.
        return {"dropped_stale": 0, "regenerated": 0, "dropped_batches": 0, "retried": 0, "discarded_duplicates": 0,
                "consumed": []}

    def _prefetch(self, step: int, newest: int, staleness: int) -> None:
        """Fetch the batch of `step` on a thread while this one trains: taking a batch (tens of MB of targets
        through the queue actor) then costs the learner nothing between steps."""
        box = {"counts": self._counts(), "item": None, "error": None}

        def fetch():
            try:
                box["item"] = self._next_item(step, newest, staleness, box["counts"])
            except BaseException as exc:  # noqa: BLE001 - raised by the train call that wanted the batch
                box["error"] = exc

        box["thread"] = threading.Thread(target=fetch, daemon=True, name="prefetch")
        box["thread"].start()
        self.prefetched = box

    def train(self, step: int, newest: int, staleness: int) -> dict:
        """One optimiser step; `newest` is the newest published version (for regeneration), `staleness` how many
        versions behind `step` a batch may be (the driver's admission bound, which follows the pools)."""
        start = time.perf_counter()
        counts, item = self._counts(), None
        box, self.prefetched = self.prefetched, None
        if box is not None:
            box["thread"].join()
            if box["error"] is not None:
                raise box["error"]
            # The driver asks for step k + 1 right after step k (a starved call starts no prefetch).
            item, counts = box["item"], box["counts"]  # with what fetching it took (drops, duplicates)
        if item is None:
            item = self._next_item(step, newest, staleness, counts)
        if item is None:
            return {**counts, "starved": True}
        t_data = time.perf_counter()
        if step + 1 < self.total_steps:
            self._prefetch(step + 1, newest, staleness)
        rollouts, targets, produced = item.rollouts, item.targets, item.stats
        out = self.learner.train_step(rollouts, targets, step)
        now = time.perf_counter()
        publish_s = None
        if (step + 1) % self.cfg.learner.publish_every == 0:
            publish_s = self.publish(step + 1)
        lag = step - produced.version
        self.metrics.set("learner_step_s", now - t_data)
        self.metrics.set("loss", out["loss"])
        self.metrics.set("version_lag", lag)
        if self.cfg.train.divergence == "forward_kl" and RECIPES[self.cfg.train.recipe].distill:
            self.metrics.set("kl", out["loss"])
        return {**out, **counts, "produced": produced, "version_lag": lag,
                "trained_on": len(rollouts), "tokens_trained": sum(len(r.tokens) for r in rollouts),
                "wait_s": t_data - start, "train_s": now - t_data, "publish_s": publish_s}
