"""The bounded queues between the stages: rollout workers -> `score-queue` -> teacher replicas ->
`rollout-queue` -> learners (recipes without teacher scoring put straight into `rollout-queue`).

`Backlog` is the rule, pure: FIFO items, each keyed by its rollout batch id; an item taken with a holder
name is leased until the holder acks it, and a holder that died or stalled has its leased items put back
at the front (`release`), so a teacher replica that dies holding a batch loses nothing. If it had already
delivered the batch, the learners discard the second copy (delivery.py).

The queue actor waits with asyncio; a poll that times out returns None instead of raising inside the actor
(each raised `Empty` showed up as a failed task in the dashboard). The client pickles to the queue's name, so
a restartable actor can take it as a constructor argument without Ray pinning it in the object store.

Items travel through the queue actor as `Packed` bytes with their batch id beside them: the actor never
unpickles a batch, so it never imports torch or the model code (a first `put` used to cost the queue seconds
of imports), and a batch is serialised once on its way from producer to consumer, not twice.
"""

from __future__ import annotations

import asyncio
import pickle
from collections import deque
from dataclasses import dataclass
from queue import Full
from typing import Any, Callable

import ray


def batch_id(item) -> int:
    return item.stats.batch


@dataclass(frozen=True)
class Packed:
    """An item as the queue actor holds it: its key, and the item pickled by the client."""

    key: int
    blob: bytes

    @classmethod
    def of(cls, item) -> "Packed":
        return cls(batch_id(item), pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))

    def unpack(self):
        return pickle.loads(self.blob)


def _unpack(packed: Packed | None):
    return None if packed is None else packed.unpack()


class Backlog:
    """Waiting items (FIFO) and leased ones (by holder), at most `maxsize` waiting."""

    def __init__(self, maxsize: int, key: Callable[[Any], int] = batch_id):
        self.maxsize, self.key = maxsize, key
        self.waiting: deque = deque()
        self.leased: dict[int, tuple[str, Any]] = {}

    def full(self) -> bool:
        return len(self.waiting) >= self.maxsize

    def push(self, item) -> None:
        self.waiting.append(item)

    def pop(self, holder: str | None = None):
        """The oldest waiting item; leased to `holder` when one is named."""
        item = self.waiting.popleft()
        if holder is not None:
            self.leased[self.key(item)] = (holder, item)
        return item

    def ack(self, holder: str, key: int) -> bool:
        """The holder is done with item `key`; False when it no longer held it (released meanwhile)."""
        if self.leased.get(key, (None,))[0] != holder:
            return False
        del self.leased[key]
        return True

    def release(self, holder: str) -> list[int]:
        """Put the holder's leased items back at the front, oldest first; their keys."""
        mine = sorted(k for k, (h, _) in self.leased.items() if h == holder)
        for key in reversed(mine):
            self.waiting.appendleft(self.leased.pop(key)[1])
        return mine

    def holders(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for key, (holder, _) in sorted(self.leased.items()):
            out.setdefault(holder, []).append(key)
        return out


class _QueueActor:
    def __init__(self, maxsize: int):
        self.book = Backlog(maxsize, key=lambda packed: packed.key)
        self.changed = asyncio.Condition()

    def qsize(self) -> int:
        return len(self.book.waiting)

    # asyncio.timeout around the wait, and nothing awaited between the wait and taking the item: a timeout
    # can then never fire after an item was taken (wait_for on Python 3.11 could, losing a rollout batch).
    async def put(self, item, timeout: float | None) -> bool:
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(lambda: not self.book.full())
                self.book.push(item)
                self.changed.notify_all()
            return True
        except TimeoutError:
            return False

    async def get(self, timeout: float, holder: str | None = None):
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(lambda: bool(self.book.waiting))
                item = self.book.pop(holder)
                self.changed.notify_all()
                return item
        except TimeoutError:
            return None

    def get_nowait(self):
        return self.book.pop() if self.book.waiting else None

    def ack(self, holder: str, key: int) -> bool:
        return self.book.ack(holder, key)

    async def release(self, holder: str) -> list[int]:
        async with self.changed:
            keys = self.book.release(holder)
            self.changed.notify_all()
            return keys

    def holders(self) -> dict[str, list[int]]:
        return self.book.holders()


class BatchQueue:
    """A named queue actor (started here) and the client calls on it."""

    def __init__(self, maxsize: int, name: str, actor=None, options: dict | None = None):
        self.name = name
        self.actor = actor or ray.remote(_QueueActor).options(name=name, num_cpus=0, **(options or {})).remote(maxsize)

    def __reduce__(self):
        return _lookup, (self.name,)

    def put(self, item, timeout: float | None = None) -> None:
        if not ray.get(self.actor.put.remote(Packed.of(item), timeout)):
            raise Full(f"{self.name} stayed full for {timeout:g}s")

    def get(self, timeout: float, holder: str | None = None):
        """The next item, or None when none arrives within `timeout` seconds; leased to `holder` if named
        (then `ack` it once it is delivered onwards)."""
        return _unpack(ray.get(self.actor.get.remote(timeout, holder)))

    def get_nowait(self):
        return _unpack(ray.get(self.actor.get_nowait.remote()))

    def ack(self, holder: str, key: int) -> bool:
        return ray.get(self.actor.ack.remote(holder, key))

    def release(self, holder: str) -> list[int]:
        """The batch ids `holder` had leased, now waiting again at the front."""
        return ray.get(self.actor.release.remote(holder))

    def qsize(self) -> int:
        return ray.get(self.actor.qsize.remote())


def _lookup(name: str) -> BatchQueue:
    return BatchQueue(0, name, ray.get_actor(name))
