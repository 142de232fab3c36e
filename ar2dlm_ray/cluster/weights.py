"""Versioned student weights, published by learner rank 0 without waiting and adopted by rollout workers
between rollouts.

A small named registry actor keeps the newest version number and how to fetch it. The payload travels
by a transport behind one interface (`publish(model, version)` on the learner, `receive(model, current,
min_version)` on a worker):
- `object_store`: `ray.put` of the state dict; the registry keeps the reference (works everywhere).
"""

from __future__ import annotations

import asyncio
import time

import ray

REGISTRY_NAME = "weights"


class WeightRegistry:
    """Async actor: the newest (version, payload); `latest` can wait for a minimum version."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.versions: dict[int, list] = {}
        self.newest = -1
        self.changed = asyncio.Condition()

    async def publish(self, version: int, payload: list) -> None:
        async with self.changed:
            if version <= self.newest:
                return  # a late duplicate (e.g. after a resume) must not roll the version back
            self.versions[version] = payload
            self.newest = version
            # Dropping old entries releases the learner's objects once no worker still reads them.
            for old in sorted(self.versions)[:-self.keep]:
                del self.versions[old]
            self.changed.notify_all()

    async def latest(self, min_version: int = -1, timeout: float | None = None):
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.newest >= min_version), timeout)
            return self.newest, self.versions[self.newest]

    async def version(self) -> int:
        return self.newest


class ObjectStoreTransport:
    """Weights as one object in the Ray object store; the reference rides in the registry."""

    name = "object_store"

    def __init__(self, registry):
        self.registry = registry

    def publish(self, model, version: int) -> float:
        start = time.perf_counter()
        ref = ray.put({k: v.detach() for k, v in model.state_dict().items()})
        # Wrapped in a list so Ray passes the reference itself (the registry borrows it) instead of the value.
        self.registry.publish.remote(version, [ref])
        return time.perf_counter() - start

    def receive(self, model, current: int, min_version: int, timeout: float | None = None) -> int:
        version, payload = ray.get(self.registry.latest.remote(min_version, timeout))
        if version > current:
            model.load_state_dict(ray.get(payload[0]))
        return version


def build_transport(name: str, registry):
    if name == "object_store":
        return ObjectStoreTransport(registry)
    raise NotImplementedError(f"learner.transport={name!r} is not available yet; use learner.transport=object_store")
