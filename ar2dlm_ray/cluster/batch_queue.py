"""The bounded queue of rollout batches between the rollout workers and the learners.

Unlike `ray.util.queue.Queue`, a poll that times out returns None instead of raising inside the queue
actor: the learners poll every couple of seconds, and each raised `Empty` showed up as a failed task in
the dashboard. The client pickles to the queue's name, so a restartable actor can take it as a
constructor argument: an actor handle there puts the arguments in the object store, which Ray warns
about in every job log because a restart could not count on them.
"""

from __future__ import annotations

import asyncio
from queue import Full

import ray


class _QueueActor:
    def __init__(self, maxsize: int):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    def qsize(self) -> int:
        return self.queue.qsize()

    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can time out after the inner get has already
    # taken its item, and that rollout batch would be lost.
    async def put(self, item, timeout: float | None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.queue.put(item)
            return True
        except TimeoutError:
            return False

    async def get(self, timeout: float):
        try:
            async with asyncio.timeout(timeout):
                return await self.queue.get()
        except TimeoutError:
            return None

    def get_nowait(self):
        return None if self.queue.empty() else self.queue.get_nowait()


class BatchQueue:
    """A named queue actor (started here) and the client calls on it."""

    def __init__(self, maxsize: int, name: str, actor=None):
        self.name = name
        self.actor = actor or ray.remote(_QueueActor).options(name=name, num_cpus=0).remote(maxsize)

    def __reduce__(self):
        return _lookup, (self.name,)

    def put(self, item, timeout: float | None = None) -> None:
        if not ray.get(self.actor.put.remote(item, timeout)):
            raise Full(f"{self.name} stayed full for {timeout:g}s")

    def get(self, timeout: float) -> dict | None:
        """The next item, or None when none arrives within `timeout` seconds."""
        return ray.get(self.actor.get.remote(timeout))

    def get_nowait(self) -> dict | None:
        return ray.get(self.actor.get_nowait.remote())

    def qsize(self) -> int:
        return ray.get(self.actor.qsize.remote())


def _lookup(name: str) -> BatchQueue:
    return BatchQueue(0, name, ray.get_actor(name))
