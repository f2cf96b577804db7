"""SlotTable: which block key sits in which slot of a pool.

Primitives: `allocate(key)` / `allocate_many(keys)` (None when full), `free(key)`, `slot_of(key)`,
`keys()`. The table keeps books only; it never touches bytes, so the decision half can keep it in
one process while the pool's memory lives in another (docs/design.md "Two halves").

Invariants: a slot holds at most one key and a key at most one slot; free slots are handed out
lowest first (a min-heap), so blocks saved together on a fresh pool get consecutive slots and move
in one copy per run.
"""

from __future__ import annotations

import heapq
from typing import Hashable, Iterable, Sequence

from kvtier.tiers.errors import ConfigError


class SlotTable:
    """Key -> slot map of a pool with `num_slots` slots."""

    __slots__ = ("num_slots", "_slot_of", "held", "_free")

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ConfigError(f"num_slots: expected a positive int, got {num_slots!r}")
        self.num_slots = num_slots
        self._slot_of: dict[Hashable, int] = {}
        #: key -> slot, read-only by contract: the hot paths count and test keys on it without a method call
        self.held = self._slot_of
        self._free = list(range(num_slots))  # already a valid min-heap

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    @property
    def num_free(self) -> int:
        """Slots not holding a block."""
        return len(self._free)

    def slot_of(self, key: Hashable) -> int | None:
        """The key's slot, or None."""
        return self._slot_of.get(key)

    def allocate(self, key: Hashable) -> int | None:
        """The key's slot (an existing one, or the lowest free one); None when the pool is full."""
        slot = self._slot_of.get(key)
        if slot is not None:
            return slot
        if not self._free:
            return None
        slot = self._slot_of[key] = heapq.heappop(self._free)
        return slot

    def allocate_many(self, keys: Sequence[Hashable]) -> list[int] | None:
        """Slots for every key (all or nothing); None when there is not room for all."""
        new = [k for k in dict.fromkeys(keys) if k not in self._slot_of]
        if len(new) > len(self._free):
            return None
        for key in new:
            self._slot_of[key] = heapq.heappop(self._free)
        return [self._slot_of[k] for k in keys]

    def free(self, key: Hashable) -> int | None:
        """Releases the key's slot and returns it (None if the key had none)."""
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            heapq.heappush(self._free, slot)
        return slot

    def free_many(self, keys: Iterable[Hashable]) -> None:
        """Releases the slots of several keys."""
        for key in keys:
            self.free(key)

    def keys(self) -> list[Hashable]:
        """Keys holding a slot now."""
        return list(self._slot_of)

    def items(self) -> list[tuple[Hashable, int]]:
        """(key, slot) pairs."""
        return list(self._slot_of.items())
