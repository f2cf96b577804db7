"""Belady's offline optimum, the bound beside every hit ratio (it reads the future, so replay only).

Primitives:
- `next_uses(requests, granularity)`: for every key of every request, when it is next used: the
  index of the next request holding it ("request"), or the index of its next occurrence in the flat
  key stream ("event", classic MIN); `NEVER` when it is not used again. One backward pass.
- `BeladyPolicy(capacity, requests)`: replays `requests` in order (its own `replay_request`),
  evicting the key whose next use is farthest in the future, ties to the least recently used, and
  never a key of the request being served (DESIGN.md "Hit-ratio semantics").
- `MinPolicy(capacity, requests)`: classic MIN at event granularity: the farthest next occurrence;
  only the key being inserted is safe, so a request's keys that are not needed again may make room
  for its later keys (hence a slightly higher ratio than request-level Belady).

Keys never used again all tie at "never" and wait in an LRU-ordered dict (most victims come from
there, in O(1)); the others sit in a lazy max-heap on (next use, -last access) with stale entries
skipped, O(log n) per operation, rebuilt when it grows past four times the cache.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterator, Sequence

from kvtier.tiers.errors import ConfigError

from .policy_base import Key, Policy, Protected, protector

#: the next use of a key that is never used again (farther than any real index)
NEVER = float("inf")


def next_uses(requests: Sequence[Sequence[Key]], granularity: str = "request") -> list[tuple[float, ...]]:
    """Per request, the next use of each of its keys (see the module docstring).

    Raises:
        ConfigError: `granularity` is neither "request" nor "event".
    """
    if granularity not in ("request", "event"):
        raise ConfigError(f"granularity: {granularity!r}; expected 'request' or 'event'")
    out: list[tuple[float, ...]] = [()] * len(requests)
    seen: dict[Key, float] = {}
    position = sum(len(keys) for keys in requests)
    for r in range(len(requests) - 1, -1, -1):
        keys = requests[r]
        get = seen.get
        out[r] = tuple(get(key, NEVER) for key in keys)
        if granularity == "request":
            for key in keys:
                seen[key] = r
        else:
            position -= len(keys)
            for i, key in enumerate(keys):
                seen[key] = position + i
    return out


class BeladyPolicy(Policy):
    """Request-level Belady (see the module docstring).

    Args:
        capacity: keys cached at most.
        requests: the whole key sequence that `replay_request` will then be called with, in order.
        future: `next_uses(requests, granularity)` when already computed (shared by several
            capacities of one sweep).
    """

    name = "belady"
    granularity = "request"
    protect_request = True

    def __init__(self, capacity: int, requests: Sequence[Sequence[Key]],
                 future: Sequence[tuple[float, ...]] | None = None) -> None:
        super().__init__(capacity)
        self._future = future if future is not None else next_uses(requests, self.granularity)
        if len(self._future) != len(requests):
            raise ConfigError(f"future: {len(self._future)} requests; expected {len(requests)}")
        self._cursor = 0
        self._now: dict[Key, float] = {}
        self._clock = 0
        self._state: dict[Key, tuple[float, int]] = {}  # key -> (next use, last access stamp)
        self._heap: list[tuple[float, int, Key]] = []  # (-next use, stamp, key), keys used again
        self._dead: OrderedDict[Key, None] = OrderedDict()  # keys never used again, oldest first

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def keys(self) -> Iterator[Key]:
        return iter(self._state)

    def _place(self, key: Key, nxt: float, stamp: int) -> None:
        dead = self._dead
        if nxt == NEVER:
            if key in dead:
                dead.move_to_end(key)
            else:
                dead[key] = None
            return
        if key in dead:
            del dead[key]
        heapq.heappush(self._heap, (-nxt, stamp, key))
        if len(self._heap) > 4 * self.capacity + 1024:
            self._heap = [(-n, st, k) for k, (n, st) in self._state.items() if n != NEVER]
            heapq.heapify(self._heap)

    def _touch(self, key: Key) -> None:
        self._clock += 1
        nxt = self._now.get(key, NEVER)
        self._state[key] = (nxt, self._clock)
        self._place(key, nxt, self._clock)

    def access(self, key: Key) -> None:
        if key not in self._state:
            raise KeyError(key)
        self._touch(key)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._state:
            raise KeyError(f"{key!r} is already cached")
        self._touch(key)

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        is_protected = protector(protected)
        for key in self._dead:  # all tie at "never": the least recently used first
            if not is_protected(key):
                return key
        heap, state = self._heap, self._state
        skipped = []
        found = None
        while heap:
            neg_next, stamp, key = heap[0]
            if state.get(key) != (-neg_next, stamp):
                heapq.heappop(heap)  # stale
                continue
            if is_protected(key):
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def remove(self, key: Key) -> None:
        del self._state[key]
        self._dead.pop(key, None)

    def replay_request(self, keys: Sequence[Key]) -> int:
        """The hit-only step for the next request of the sequence given at construction.

        Raises:
            ConfigError: more requests replayed than were given, or keys that differ from them.
        """
        r = self._cursor
        if r >= len(self._future) or len(self._future[r]) != len(keys):
            raise ConfigError(f"{self.name}: request {r} does not match the sequence given at construction")
        self._cursor = r + 1
        self._now = now = dict(zip(keys, self._future[r]))
        hits = self.lookup(keys)
        state = self._state
        if not self.protect_request:
            for key in keys:
                if key not in state and len(state) >= self.capacity:
                    victim = self.victim()
                    if victim is None:
                        break
                    self.remove(victim)
                self._touch(key)
            return hits
        # The request's own keys may not be evicted while it is served: they join the eviction
        # order only when it ends (skipping them on every eviction would be quadratic).
        pending = []
        dead, capacity = self._dead, self.capacity
        clock = self._clock
        for key in keys:
            if key not in state and len(state) >= capacity:
                victim = None
                for old in dead:  # inlined `victim(now)`: this is the replay's hot loop
                    if old not in now:
                        victim = old
                        break
                if victim is None:
                    victim = self.victim(now)
                    if victim is None:
                        break
                del state[victim]
                dead.pop(victim, None)
            clock += 1
            state[key] = (now[key], clock)
            pending.append(key)
        self._clock = clock
        heap, push = self._heap, heapq.heappush
        for key in pending:  # inlined `_place`
            nxt, stamp = state[key]
            if nxt == NEVER:
                if key in dead:
                    dead.move_to_end(key)
                else:
                    dead[key] = None
            else:
                if key in dead:
                    del dead[key]
                push(heap, (-nxt, stamp, key))
        if len(heap) > 4 * capacity + 1024:
            self._heap = [(-n, st, k) for k, (n, st) in state.items() if n != NEVER]
            heapq.heapify(self._heap)
        return hits


class MinPolicy(BeladyPolicy):
    """Classic MIN at event granularity (see the module docstring)."""

    name = "min"
    granularity = "event"
    protect_request = False
