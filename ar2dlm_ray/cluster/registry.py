"""The weight registry: a small named actor on the driver's node that keeps the newest published version of the
student weights and how to fetch it (what a transport in weights.py put there), and lets a rollout worker wait
for a version. It holds references only, so its process never imports torch (a second of CPU at every start).
"""

from __future__ import annotations

import asyncio

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
