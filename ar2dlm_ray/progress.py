"""The step line both trainers print: wall-clock time, progress, throughput, ETA and dropped rollouts, then
the trainer's own fields."""

from __future__ import annotations

import time
from collections import deque

WINDOW = 10  # step lines that tokens/s is measured over: it follows a resize or a slowdown within a few steps


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """ETA over the steps taken by this process (a resumed run's earlier steps took no time here, so they must
    not count); tokens/s over the last WINDOW step lines (since the start until there are that many)."""

    def __init__(self, start_step: int, total_steps: int, start_tokens: int = 0):
        self.start_step, self.total_steps, self.start_tokens = start_step, total_steps, start_tokens
        self.started = time.monotonic()
        self.recent: deque = deque(maxlen=WINDOW)  # (time, tokens trained) at the last lines

    def tokens_per_s(self, now: float, tokens_trained: int) -> float:
        then, before = self.recent[0] if len(self.recent) == WINDOW else (self.started, self.start_tokens)
        self.recent.append((now, tokens_trained))
        return (tokens_trained - before) / max(now - then, 1e-9)

    def line(self, step: int, loss: float, tokens_trained: int, drops: int, extra: str = "",
             now: float | None = None, step_drops: int | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        done = step - self.start_step
        eta = (self.total_steps - step) * elapsed / done if done > 0 else 0.0
        tokens_per_s = self.tokens_per_s(now, tokens_trained)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        # `step_drops`: those since the last line, so that a burst shows where it happened.
        recent = f" (+{step_drops})" if step_drops is not None else ""
        return (f"[train] {stamp} step {step}/{self.total_steps} loss {loss:.4f} tokens/s {tokens_per_s:.0f} "
                f"eta {_clock(eta)} drops {drops}{recent}" + (f" {extra}" if extra else ""))
