"""The members of an elastic pool (rollout workers or teacher replicas), as pure bookkeeping: who is
starting, active or draining, how many calls each has in flight, and which one takes the next call.

A member that is scaled away is drained: it gets no new calls, and it is stopped only once its calls in
flight have returned, so the batch it was working on is delivered and nothing is lost. The actors
themselves are made by the `start` callable (the driver's), so this object is tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Member:
    index: int
    name: str
    handle: Any
    state: str = "starting"  # starting -> active -> draining
    calls: int = 0  # calls in flight
    since: float = 0.0  # when the call it is working on began (about: when the one before it returned)
    not_before: float = 0.0  # after a failure: a restarting actor refuses calls for a while
    picked: int = -1  # when it was last picked (a sequence number)


class Pool:
    def __init__(self, kind: str, start: Callable[[int, str], Any]):
        self.kind, self._start = kind, start
        self.members: dict[str, Member] = {}
        self.started = 0  # indices are never reused: a stopped actor's name is released asynchronously
        self.picks = 0

    def live(self) -> list[Member]:
        """Members that count towards the size: starting or active."""
        return [m for m in self.members.values() if m.state != "draining"]

    @property
    def size(self) -> int:
        return len(self.live())

    def names(self) -> list[str]:
        return [m.name for m in self.live()]

    def resize(self, target: int) -> tuple[list[Member], list[Member]]:
        """Start or drain members until `size == target`; (started, draining). The newest go first, and
        members still starting before active ones."""
        started, draining = [], []
        while self.size < target:
            index = self.started
            self.started += 1
            name = f"{self.kind}-{index}"
            member = self.members[name] = Member(index, name, self._start(index, name))
            started.append(member)
        for member in sorted(self.live(), key=lambda m: (m.state == "starting", m.index), reverse=True):
            if self.size <= target:
                break
            member.state = "draining"
            draining.append(member)
        return started, draining

    def activate(self, name: str) -> None:
        if self.members[name].state == "starting":
            self.members[name].state = "active"

    def pick(self, now: float, avoid: str | None = None) -> Member | None:
        """The active member with the fewest calls in flight (on ties, the one picked least recently, so idle
        members take turns and a new one gets work at once), preferring one other than `avoid` (where a call
        just failed); None when no member can take a call now."""
        ready = [m for m in self.members.values() if m.state == "active" and m.not_before <= now]
        if not ready:
            return None
        others = [m for m in ready if m.name != avoid] or ready
        chosen = min(others, key=lambda m: (m.calls, m.picked, m.index))
        chosen.picked, self.picks = self.picks, self.picks + 1
        return chosen

    def retire(self) -> list[Member]:
        """Draining members with nothing in flight: removed here, for the caller to stop."""
        done = [m for m in self.members.values() if m.state == "draining" and m.calls == 0]
        for member in done:
            del self.members[member.name]
        return done


def busy_seconds(spans: list[tuple[float, float]], counted: float, start: float, end: float) -> tuple[float, float]:
    """How many seconds of the window [start, end] one actor was busy: the union of its busy `spans` (start,
    end), less the time up to `counted`, which was counted before; so an actor never counts more than the
    window, however its spans overlap. Returns (seconds, the new `counted`)."""
    low = max(counted, start)
    busy, reach = 0.0, low
    for a, b in sorted((max(a, low), min(b, end)) for a, b in spans):
        busy += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    return busy, max(counted, reach)
