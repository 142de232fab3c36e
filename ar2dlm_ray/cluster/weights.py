"""Versioned student weights, published by learner rank 0 without waiting and adopted by rollout workers
between rollouts.

A small named registry actor (registry.py) keeps the newest version number and how to fetch it. The payload travels
by a transport behind one interface (`publish(model, version)` on the learner, `receive(model, current,
min_version)` on a worker):
- `object_store`: the state as one flat array per dtype, `ray.put` by a background thread; the registry
  keeps the references (works everywhere, and workers may be restarted).
- `collective`: a gloo broadcast group of learner rank 0 and every rollout worker; the state dict is
  packed into one flat buffer per dtype and broadcast in chunks. A sender thread on the learner
  broadcasts the newest snapshot; a receiver thread on each worker stages it. Its membership is fixed:
  a restarted rollout worker cannot rejoin (use object_store where workers may die).
Either way `publish` blocks the learner only for one copy of the weights into a reused snapshot.

What is published is a WeightSource: a model's own state, or the full weights of a sharded (FSDP2) learner,
gathered one tensor at a time straight into the snapshot, so that no rank ever holds a full copy on its GPU.
"""

from __future__ import annotations

import threading
import time
import warnings
from datetime import timedelta

import ray
import torch

class WeightSource:
    """The weights a transport publishes: every entry's shape and dtype known up front (`meta`), each tensor
    read by key. Gathered from shards, a read is a collective: every rank must read the same keys in the same
    order (`order`, the transports' packing order; `drain` on ranks that publish nothing)."""

    def __init__(self, meta: dict[str, tuple[tuple, torch.dtype]], read, on_gpu: bool):
        self.meta, self._read, self.on_gpu = meta, read, on_gpu

    @classmethod
    def of_model(cls, model) -> "WeightSource":
        state = model.state_dict()
        return cls({k: (tuple(t.shape), t.dtype) for k, t in state.items()}, state.__getitem__,
                   any(t.is_cuda for t in state.values()))

    @classmethod
    def gathered(cls, model, dtype: torch.dtype) -> "WeightSource":
        """A sharded model's full weights, floating entries in `dtype` (at most one full tensor at a time)."""
        from ..learner import full_tensor

        state = model.state_dict()  # DTensor shards: nothing gathered yet
        meta = {k: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for k, t in state.items()}
        return cls(meta, lambda key: full_tensor(state[key], dtype), any(t.is_cuda for t in state.values()))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._read(key)

    def order(self) -> list[str]:
        return [key for _, keys in _by_dtype(self.meta) for key in keys]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every entry, on the CPU (what rank 0 writes as a Hugging Face directory)."""
        return {key: self[key].cpu() for key in self.order()}

    @staticmethod
    def drain(weights) -> None:
        """Take part in a gathered source's collectives without keeping anything (ranks other than 0)."""
        if isinstance(weights, WeightSource):
            for key in weights.order():
                weights[key]


def as_source(weights) -> WeightSource:
    return weights if isinstance(weights, WeightSource) else WeightSource.of_model(weights)


def _by_dtype(meta: dict[str, tuple[tuple, torch.dtype]]) -> list[tuple[torch.dtype, list[str]]]:
    """The keys grouped by dtype (in order), one flat buffer each."""
    groups: dict[torch.dtype, list[str]] = {}
    for key, (_, dtype) in meta.items():
        groups.setdefault(dtype, []).append(key)
    return list(groups.items())


def _numel(shape: tuple) -> int:
    return int(torch.Size(shape).numel())


def _pack(source: WeightSource, keys: list[str], flat: torch.Tensor) -> None:
    """The tensors `keys` of `source`, one after another, into `flat` (on the CPU; from any device)."""
    offset = 0
    for key in keys:
        t = source[key].detach()
        flat[offset:offset + t.numel()].view(t.shape).copy_(t)
        offset += t.numel()


def _unpack(flat: torch.Tensor, state: dict, keys: list[str]) -> None:
    """Inverse of `_pack`: `flat`'s consecutive slices into the tensors `keys` of `state`, in place."""
    offset = 0
    with torch.no_grad():
        for key in keys:
            t = state[key]
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


def _flat_for(source: WeightSource, keys: list[str]) -> torch.Tensor:
    """A flat CPU buffer for `keys` (pinned when they live on a GPU, for fast copies to and from it). Zeroed:
    its pages are mapped now, not on the first publication (which would then take twice as long)."""
    return torch.zeros(sum(_numel(source.meta[k][0]) for k in keys), dtype=source.meta[keys[0]][1],
                       pin_memory=source.on_gpu and torch.cuda.is_available())


class ObjectStoreTransport:
    """Weights as one flat object per dtype in the Ray object store; the references ride in the registry.

    `publish` only copies the state into one of two flat snapshots, allocated once and reused; a
    background thread `ray.put`s it (as a uint8 numpy array: one memory copy into the store, where a
    state dict of torch tensors is pickled in-band, several times slower) and then tells the registry.
    On the receiver `ray.get` of the flat arrays maps them from the node's store without a copy; their
    slices are copied into the model.
    """

    name = "object_store"

    def __init__(self, registry):
        self.registry = registry
        self.layout: list[tuple[torch.dtype, list[str]]] | None = None  # one flat buffer per dtype
        self.cond = threading.Condition()
        self.snapshots: list[list[torch.Tensor]] = []
        self.putting: int | None = None  # the snapshot being written to the object store
        self.pending: tuple[int, int] | None = None  # (version, snapshot) to put next
        self.error: BaseException | None = None

    # learner rank 0
    def publish(self, model, version: int) -> float:
        start = time.perf_counter()
        if self.error is not None:
            raise RuntimeError("the weight publication thread failed") from self.error
        state = as_source(model)
        if self.layout is None:
            self.layout = _by_dtype(state.meta)
            self.snapshots = [[_flat_for(state, keys) for _, keys in self.layout] for _ in range(2)]
            threading.Thread(target=self._guarded, daemon=True, name="weights-put").start()
        with self.cond:
            index = 1 if self.putting == 0 else 0  # never the snapshot being put
            if self.pending is not None and self.pending[1] == index:
                self.pending = None  # an unput older version: overwritten by this one
        for flat, (_, keys) in zip(self.snapshots[index], self.layout):
            _pack(state, keys, flat)  # the copy is the only part the learner waits for
        with self.cond:
            self.pending = (version, index)
            self.cond.notify_all()
        return time.perf_counter() - start

    def _guarded(self) -> None:
        try:
            self._put_loop()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the learner on its next publish
            self.error = exc

    def _put_loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending is not None)
                version, self.putting = self.pending
                self.pending = None
            refs = [ray.put(flat.view(torch.uint8).numpy()) for flat in self.snapshots[self.putting]]
            with self.cond:
                self.putting = None
            # The refs inside a list: Ray passes the references themselves (the registry borrows them).
            self.registry.publish.remote(version, [[(dtype, keys) for dtype, keys in self.layout], *refs])

    # rollout workers
    def receive(self, model, current: int, min_version: int, timeout: float | None = None) -> int:
        version, payload = ray.get(self.registry.latest.remote(min_version, timeout))
        if version > current:
            layout, arrays = payload[0], ray.get(payload[1:])
            state = model.state_dict()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # only read here
                flats = [torch.from_numpy(a).view(dtype) for a, (dtype, _) in zip(arrays, layout)]
            for flat, (_, keys) in zip(flats, layout):
                _unpack(flat, state, keys)
            del flats, arrays  # release the store's buffers
        return version


class CollectiveTransport:
    """Broadcast over a gloo group: rank 0 is learner rank 0, ranks 1..n the rollout workers.

    The state travels as one flat buffer per dtype, broadcast in chunks of `chunk_mb`. Both sides keep two
    such snapshots, allocated once and reused (a fresh 1 GB allocation per version cost more than the
    copy): one is on the wire while the other is written (sender) or read (receiver). The copies overlap
    the wire: the sender thread broadcasts a chunk as soon as `publish` has packed it, and a `receive`
    waiting for a version in flight copies each tensor into the model as soon as its chunk has arrived.
    """

    name = "collective"

    def __init__(self, registry, chunk_mb: int = 64):
        self.registry, self.chunk_bytes = registry, chunk_mb << 20
        self.group = None
        self.cond = threading.Condition()
        self.snapshots: list[list[torch.Tensor]] = []
        self.sending: int | None = None  # the snapshot being broadcast
        self.reading: int | None = None  # receiver: the snapshot being copied into the model
        self.pending: tuple[int, int] | None = None  # (version, snapshot) to send next
        self.staged: tuple[int, int] | None = None  # receiver: (version, snapshot) newest complete
        self.incoming: tuple[int, int] | None = None  # receiver: (version, snapshot) on the wire
        self.filled = [0, 0]  # bytes of each snapshot written so far (packed, or arrived)
        self.error: BaseException | None = None

    def join(self, store, rank: int, world: int, model) -> None:
        self.group = torch.distributed.ProcessGroupGloo(store, rank, world, timedelta(seconds=1800))
        state = as_source(model)
        self.layout = _by_dtype(state.meta)
        # Where each tensor ends in the snapshot's bytes (the flats one after another): the progress it waits for.
        self.ends, end = [], 0
        for dtype, keys in self.layout:
            ends = []
            for key in keys:
                end += _numel(state.meta[key][0]) * dtype.itemsize
                ends.append(end)
            self.ends.append(ends)
        self.snapshots = [[_flat_for(state, keys) for _, keys in self.layout] for _ in range(2)]
        loop = self._send_loop if rank == 0 else self._receive_loop
        threading.Thread(target=self._guarded, args=(loop,), daemon=True, name=f"weights-{loop.__name__}").start()

    def _guarded(self, loop) -> None:
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the actor on its next call
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _chunks(self, index: int):
        """(chunk, the snapshot's byte count once it is complete) for every chunk of snapshot `index`."""
        done = 0
        for flat in self.snapshots[index]:
            for chunk in flat.view(torch.uint8).split(self.chunk_bytes):
                done += chunk.numel()
                yield chunk, done

    def _progress(self, index: int, nbytes: int) -> None:
        with self.cond:
            self.filled[index] = nbytes
            self.cond.notify_all()

    # learner rank 0
    def publish(self, model, version: int) -> float:
        start = time.perf_counter()
        if self.error is not None:
            raise RuntimeError("the weight broadcast group failed") from self.error
        state = as_source(model)
        with self.cond:
            index = 1 if self.sending == 0 else 0  # never the snapshot being sent
            # The sender may take this version at once and broadcast each chunk as soon as it is packed.
            self.filled[index] = 0
            self.pending = (version, index)  # replaces an unsent older version
            self.cond.notify_all()
        # The copy is the only part the learner waits for.
        for flat, (_, keys), ends in zip(self.snapshots[index], self.layout, self.ends):
            offset = 0
            for key, end in zip(keys, ends):
                t = state[key].detach()
                flat[offset:offset + t.numel()].view(t.shape).copy_(t)
                offset += t.numel()
                self._progress(index, end)
        self.registry.publish.remote(version, [None])
        return time.perf_counter() - start

    def _send_loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending is not None)
                (version, index), self.pending = self.pending, None
                self.sending = index
            self.group.broadcast(torch.tensor([version], dtype=torch.long), 0).wait()
            for chunk, done in self._chunks(index):
                with self.cond:
                    self.cond.wait_for(lambda: self.filled[index] >= done)
                self.group.broadcast(chunk, 0).wait()
            with self.cond:
                self.sending = None

    # rollout workers
    def _receive_loop(self) -> None:
        index = 0
        while True:
            header = torch.zeros(1, dtype=torch.long)
            self.group.broadcast(header, 0).wait()
            with self.cond:
                self.cond.wait_for(lambda: self.reading != index)
                self.incoming, self.filled[index] = (int(header), index), 0
            for chunk, done in self._chunks(index):
                self.group.broadcast(chunk, 0).wait()
                self._progress(index, done)
            with self.cond:
                self.staged, self.incoming = (int(header), index), None
                self.cond.notify_all()
            index = 1 - index

    def receive(self, model, current: int, min_version: int, timeout: float | None = None) -> int:
        if self.group is None:
            raise RuntimeError("this rollout worker is not in the weight broadcast group (restarted?); "
                               "learner.transport=collective cannot replace a dead worker; use object_store")
        with self.cond:
            # A version in flight is good enough: its tensors are copied as their chunks arrive.
            if not self.cond.wait_for(lambda: self.error is not None or max((self.staged or (-1,))[0],
                                                                            (self.incoming or (-1,))[0]) >= min_version,
                                      timeout):
                raise TimeoutError(f"weight version {min_version} did not arrive in {timeout}s")
            if self.error is not None:
                raise RuntimeError("the weight broadcast group failed") from self.error
            version, index = self.staged if (self.staged or (-1,))[0] >= min_version else self.incoming
            if version <= current:
                return version
            self.reading = index
        try:
            state = model.state_dict()
            with torch.no_grad():
                for flat, (_, keys), ends in zip(self.snapshots[index], self.layout, self.ends):
                    offset = 0
                    for key, end in zip(keys, ends):
                        with self.cond:
                            if self.filled[index] < end and not self.cond.wait_for(
                                    lambda: self.error is not None or self.filled[index] >= end, timeout):
                                raise TimeoutError(f"weight version {version} stalled on the wire")
                            if self.error is not None:
                                raise RuntimeError("the weight broadcast group failed") from self.error
                        t = state[key]
                        t.copy_(flat[offset:offset + t.numel()].view(t.shape))
                        offset += t.numel()
        finally:
            with self.cond:
                self.reading = None
                self.cond.notify_all()
        return version


def build_transport(name: str, registry):
    if name == "object_store":
        return ObjectStoreTransport(registry)
    if name == "collective":
        return CollectiveTransport(registry)
    raise ValueError(f"unknown learner.transport {name!r}")
