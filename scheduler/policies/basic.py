"""FIFO and LRU: the recency baselines (what vLLM's kv_offload and kvcache-simulator ship).

Primitives: `FIFOPolicy` (insertion order; a hit changes nothing), `LRUPolicy` (a hit makes the
key most recent). Both keep one `OrderedDict` (oldest first), so every operation is O(1) and a
`victim` scan skips only the protected keys at the old end.

`FIFOPolicy.replay_request` and `LRUPolicy.replay_request` are the hit-only step of `Policy.replay_request` written directly on the
OrderedDict (same effect, about 3x faster).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Sequence

from kvtier.scheduler.policies.base import Key, Policy, Protected, leading_hits, protector


class FIFOPolicy(Policy):
    """First in, first out: evicts the key inserted longest ago; hits do not reorder."""

    name = "fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def keys(self) -> Iterator[Key]:
        return iter(self._order)

    def access(self, key: Key) -> None:
        if key not in self._order:
            raise KeyError(key)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._order:
            raise KeyError(f"{key!r} is already cached")
        self._order[key] = None

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        if protected is None:
            return next(iter(self._order), None)
        is_protected = protector(protected)
        for key in self._order:
            if not is_protected(key):
                return key
        return None

    def remove(self, key: Key) -> None:
        del self._order[key]

    def replay_request(self, keys: Sequence[Key]) -> int:
        hits = leading_hits(self._order, keys)
        _admit_in_order(self._order, keys[hits:], self.capacity, refresh=False)
        return hits


class LRUPolicy(FIFOPolicy):
    """Least recently used: a hit moves the key to the most recent end; evicts the oldest."""

    name = "lru"

    def access(self, key: Key) -> None:
        self._order.move_to_end(key)

    def replay_request(self, keys: Sequence[Key]) -> int:
        hits = leading_hits(self._order, keys)
        _admit_in_order(self._order, keys, self.capacity, refresh=True)
        return hits


def _admit_in_order(order: "OrderedDict[Key, None]", keys: Sequence[Key], capacity: int, refresh: bool) -> None:
    """The hit-only step of the queue policies: each key in prompt order is inserted at the recent end,
    evicting from the old end when full; a cached key moves to the recent end only when `refresh`
    (LRU, not FIFO). One loop per key of the trace: the room is counted here, not asked per key."""
    move = order.move_to_end
    room = capacity - len(order)
    for key in keys:
        if key in order:
            if refresh:
                move(key)
        else:
            if room > 0:
                room -= 1
            else:
                order.popitem(last=False)
            order[key] = None
