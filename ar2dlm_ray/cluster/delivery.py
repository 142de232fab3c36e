"""Exactly-once delivery of rollout batches to the learner group.

A rollout batch can reach the queue twice: a worker that dies after putting its batch, but before its
`produce` call returns, has that batch redone elsewhere by the driver; a stalled call that is abandoned
may still deliver. Every delivery carries its batch id, and the first delivery of an id decides its fate
(trained, or dropped as stale); any later delivery of that id is discarded and counted. The ledger is a
plain object (tested without Ray); the driver runs one as a named actor that every learner rank asks
before it trains, so two ranks never train the same id either.
"""

from __future__ import annotations

from typing import Literal

Outcome = Literal["trained", "dropped"]
LEDGER_NAME = "delivery-ledger"


class DeliveryLedger:
    def __init__(self):
        self.fate: dict[int, Outcome] = {}
        self.discarded: dict[int, int] = {}  # batch id -> later deliveries thrown away

    def claim(self, batch: int, outcome: Outcome) -> bool:
        """Record the first delivery of `batch` with its outcome (True); a repeat is discarded (False)."""
        if outcome not in ("trained", "dropped"):
            raise ValueError(f"outcome must be 'trained' or 'dropped', got {outcome!r}")
        if batch in self.fate:
            self.discarded[batch] = self.discarded.get(batch, 0) + 1
            return False
        self.fate[batch] = outcome
        return True

    def snapshot(self, below: int) -> dict:
        """The fates of batch ids below `below` (those a checkpoint covers; a resume redoes the rest), for
        `restore` on resume."""
        return {"fate": {b: o for b, o in self.fate.items() if b < below},
                "discarded": {b: n for b, n in self.discarded.items() if b < below}}

    def restore(self, snapshot: dict) -> None:
        self.fate.update(snapshot.get("fate", {}))
        self.discarded.update(snapshot.get("discarded", {}))

    def summary(self) -> dict:
        """Deliveries consumed = trained + dropped + discarded, with the ids behind each count."""
        trained = sorted(b for b, o in self.fate.items() if o == "trained")
        dropped = sorted(b for b, o in self.fate.items() if o == "dropped")
        discarded = sum(self.discarded.values())
        return {"consumed": len(self.fate) + discarded, "trained": len(trained), "dropped": len(dropped),
                "discarded_duplicates": discarded, "trained_ids": trained, "dropped_ids": dropped,
                "discarded_ids": sorted(self.discarded)}
