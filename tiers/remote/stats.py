"""The remote tier's counters, and the guard that closes a load's destinations when the load returns.

Primitives:
- `RemoteStats`: a snapshot of one `RemoteTier`'s counters (hits, misses by reason, unavailable blocks,
  acknowledged saves, probes, bytes).
- `Delivery`: the destinations of one `get_many`: `begin()` before a copy into them (False once closed),
  `end()` after it, `close(timeout_s)` when the call returns: no copy starts after it, and it waits
  (bounded) for the copies under way, so a node that overran its deadline never writes into memory
  the engine has been told holds no KV.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """Counters of one remote tier.

    Attributes:
        hits / misses: blocks delivered / not delivered by `get_many` (absent, bad, or node failure).
        corrupt / foreign: values that failed their checksum or header / named another model or block.
        unavailable: blocks missed or not saved because their node failed, timed out or moved the slot.
        acknowledged_blocks: blocks whose SET the server acknowledged.
        probes / probed_blocks: `probe` calls and the keys they asked about.
        bytes_read / bytes_written: value bytes received / sent.
    """

    hits: int
    misses: int
    corrupt: int
    foreign: int
    unavailable: int
    acknowledged_blocks: int
    probes: int
    probed_blocks: int
    bytes_read: int
    bytes_written: int


class Delivery:
    """The destinations of one `get_many`, closed when the call returns: a reply that arrives later (from a
    node that overran the deadline) is dropped, and closing waits for copies already under way."""

    __slots__ = ("cond", "open", "active")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.open = True
        self.active = 0

    def begin(self) -> bool:
        """Whether a copy into a destination may start now (then `end()` must follow)."""
        with self.cond:
            if self.open:
                self.active += 1
            return self.open

    def end(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def close(self, timeout_s: float) -> None:
        """No copy starts after this; waits (bounded) for the ones under way."""
        with self.cond:
            self.open = False
            self.cond.wait_for(lambda: self.active == 0, timeout_s)
