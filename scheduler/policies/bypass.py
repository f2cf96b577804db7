"""Belady with bypass on the prefix tree: the exact offline optimum under the prefix-hit rule.

Under the prefix rule a hit on block b needs b held since its previous use; with chained keys a
parent's interval nests inside its child's, so the optimum is a maximum interval packing, which
request-level Belady with bypass and deepest-first ties computes. `BeladyBypassPolicy` replays a
known request sequence (offline only).
"""

from __future__ import annotations

import heapq
from typing import Iterator, Sequence

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.policies.base import Key, Protected, heap_victim, protector
from kvtier.scheduler.policies.belady import BeladyPolicy


class BeladyBypassPolicy(BeladyPolicy):
    """Prefix-tree Belady that may decline to admit (kvcache-simulator's "optimal", to the digit).

    Differences from `BeladyPolicy`, each one a way a real prefix cache may behave:
    - only leaves are evicted (a prefix outlives its suffixes), the one needed farthest in the
      future first, ties to the key first seen most recently;
    - a key is admitted only when its parent is cached and some evictable leaf is needed later
      than it (otherwise neither it nor the rest of its request is inserted: bypass).
    A cache allowed to refuse keys can do better than forced insertion, so this bounds admission
    filters; docs/design.md's `belady` inserts every key.
    """

    name = "opt"

    def __init__(self, capacity: int, requests: Sequence[Sequence[Key]],
                 future: Sequence[tuple[float, ...]] | None = None) -> None:
        super().__init__(capacity, requests, future)
        self._state: dict[Key, tuple[float, int]] = {}  # key -> (next use, unused)
        self._kids: dict[Key, int] = {}
        self._parent_of: dict[Key, Key | None] = {}
        self._first_seen: dict[Key, int] = {}
        for keys in requests:  # first appearance in the trace (kvcache-simulator's trie node order)
            for key in keys:
                self._first_seen.setdefault(key, len(self._first_seen))
        self._leaves: list[tuple[float, int, Key]] = []  # (-next use, -first seen, key)

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def keys(self) -> Iterator[Key]:
        return iter(self._state)

    def _push_leaf(self, key: Key) -> None:
        heapq.heappush(self._leaves, (-self._state[key][0], -self._first_seen[key], key))

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        is_protected = protector(protected)
        state, kids = self._state, self._kids
        return heap_victim(self._leaves, lambda e: e[2] not in state or kids[e[2]] or state[e[2]][0] != -e[0],
                           is_protected)

    def remove(self, key: Key) -> None:
        del self._state[key]
        del self._kids[key]
        parent = self._parent_of.pop(key)
        if parent is not None and parent in self._state:
            self._kids[parent] -= 1
            if not self._kids[parent]:
                self._push_leaf(parent)

    def replay_request(self, keys: Sequence[Key]) -> int:
        r = self._cursor
        if r >= len(self._future) or len(self._future[r]) != len(keys):
            raise ConfigError(f"{self.name}: request {r} does not match the sequence given at construction")
        self._cursor = r + 1
        self._now = now = dict(zip(keys, self._future[r]))
        state = self._state
        hits = self.lookup(keys)
        for key in keys[:hits]:
            state[key] = (now[key], 0)
            if not self._kids[key]:
                self._push_leaf(key)
        parent = None
        for key in keys:
            if key in state:
                parent = key
                continue
            if parent is not None and parent not in state:
                break  # its prefix is not cached: it could never be hit
            if len(state) >= self.capacity:
                victim = self.victim(now)
                if victim is None or state[victim][0] <= now[key]:
                    break  # bypass: nothing evictable is needed later than this key
                self.remove(victim)
            state[key] = (now[key], 0)
            self._kids[key] = 0
            self._parent_of[key] = parent
            if parent is not None:
                self._kids[parent] += 1
            self._push_leaf(key)
            parent = key
        if len(self._leaves) > 4 * self.capacity + 1024:
            self._leaves = [(-state[k][0], -self._first_seen[k], k) for k in state if not self._kids[k]]
            heapq.heapify(self._leaves)
        return hits
