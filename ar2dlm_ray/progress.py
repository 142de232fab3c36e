"""The step line both trainers print: wall-clock time, progress, throughput, ETA and dropped rollouts, then
the trainer's own fields."""

from __future__ import annotations

import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Throughput and ETA over the steps taken by this process (a resumed run's earlier steps took no time
    here, so they must not count)."""

    def __init__(self, start_step: int, total_steps: int, start_tokens: int = 0):
        self.start_step, self.total_steps, self.start_tokens = start_step, total_steps, start_tokens
        self.started = time.monotonic()

    def line(self, step: int, loss: float, tokens_trained: int, drops: int, extra: str = "",
             now: float | None = None, step_drops: int | None = None) -> str:
        elapsed = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        done = step - self.start_step
        eta = (self.total_steps - step) * elapsed / done if done > 0 else 0.0
        tokens_per_s = (tokens_trained - self.start_tokens) / elapsed
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        # `step_drops`: those since the last line, so that a burst shows where it happened.
        recent = f" (+{step_drops})" if step_drops is not None else ""
        return (f"[train] {stamp} step {step}/{self.total_steps} loss {loss:.4f} tokens/s {tokens_per_s:.0f} "
                f"eta {_clock(eta)} drops {drops}{recent}" + (f" {extra}" if extra else ""))
