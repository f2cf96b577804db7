"""Belady's offline optimum, the bound beside every hit ratio (it reads the future, so replay only).

Primitives:
- `next_uses(requests, granularity)`: for every key of every request, when it is next used: the
  index of the next request holding it ("request"), or the index of its next occurrence in the flat
  key stream ("event", classic MIN); `NEVER` when it is not used again. One backward pass.
- `BeladyPolicy(capacity, requests)`: replays `requests` in order (its own `replay_request`),
  evicting the key whose next use is farthest in the future, ties to the least recently used, and
  never a key of the request being served (DESIGN.md "Hit-ratio semantics").
- `BeladyBypassPolicy`: the same, but a key needed no sooner than the best victim is not admitted
  (nor the rest of its request): the bound of a cache that may refuse keys, kvcache-simulator's
  "optimal".
- `MinPolicy(capacity, requests)`: classic MIN at event granularity: the farthest next occurrence;
  only the key being inserted is safe, so a request's keys that are not needed again may make room
  for its later keys (hence a slightly higher ratio than request-level Belady).

Keys never used again all tie at "never" and wait in a FIFO of (key, stamp) in access order (most
victims come from there, in O(1)); the others sit in a max-heap on (next use, -last
access). Both are lazy: an entry whose stamp is not its key's current stamp is stale and skipped;
both are compacted as they grow. O(log n) per operation.
"""

from __future__ import annotations

import heapq
from itertools import repeat
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
    get, never = seen.get, repeat(NEVER)
    position = sum(len(keys) for keys in requests)
    for r in range(len(requests) - 1, -1, -1):
        keys = requests[r]
        out[r] = tuple(map(get, keys, never))
        if granularity == "request":
            seen.update(dict.fromkeys(keys, r))
        else:
            position -= len(keys)
            seen.update(zip(keys, range(position, position + len(keys))))
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
        self._current: tuple[Sequence[Key], Sequence[float]] = ((), ())
        self._now: dict[Key, float] | None = {}
        self._clock = 0
        self._stamp: dict[Key, int] = {}  # cached key -> stamp of its last access (unique, increasing)
        # Both orders are lazy: an entry whose stamp is not the key's current stamp is stale.
        self._heap: list[tuple[float, int, Key]] = []  # (-next use, stamp, key): keys used again
        # keys never used again, oldest first: a queue of two parallel lists read from `_head`
        self._dead_keys: list[Key] = []
        self._dead_stamps: list[int] = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._stamp)

    def __contains__(self, key: object) -> bool:
        return key in self._stamp

    def keys(self) -> Iterator[Key]:
        return iter(self._stamp)

    def _compact(self) -> None:
        stamp_of = self._stamp
        if len(self._heap) > 4 * self.capacity + 1024:
            self._heap = [e for e in self._heap if stamp_of.get(e[2]) == e[1]]
            heapq.heapify(self._heap)
        if self._head > 2 * self.capacity + 1024:
            pairs = [(k, st) for k, st in zip(self._dead_keys[self._head:], self._dead_stamps[self._head:])
                     if stamp_of.get(k) == st]
            self._dead_keys = [k for k, _ in pairs]
            self._dead_stamps = [st for _, st in pairs]
            self._head = 0

    def _touch(self, key: Key) -> None:
        if self._now is None:
            self._now = dict(zip(*self._current))
        self._clock += 1
        nxt = self._now.get(key, NEVER)
        self._stamp[key] = self._clock
        if nxt == NEVER:
            self._dead_keys.append(key)
            self._dead_stamps.append(self._clock)
        else:
            heapq.heappush(self._heap, (-nxt, self._clock, key))
        self._compact()

    def access(self, key: Key) -> None:
        if key not in self._stamp:
            raise KeyError(key)
        self._touch(key)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._stamp:
            raise KeyError(f"{key!r} is already cached")
        self._touch(key)

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        is_protected = protector(protected)
        stamp_of, keys, stamps = self._stamp, self._dead_keys, self._dead_stamps
        while self._head < len(keys) and stamp_of.get(keys[self._head]) != stamps[self._head]:
            self._head += 1  # stale
        for i in range(self._head, len(keys)):  # all tie at "never": the least recently used first
            if stamp_of.get(keys[i]) == stamps[i] and not is_protected(keys[i]):
                return keys[i]
        heap = self._heap
        skipped = []
        found = None
        while heap:
            _, stamp, key = heap[0]
            if stamp_of.get(key) != stamp:
                heapq.heappop(heap)  # stale
                continue
            if is_protected(key):
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return found

    def remove(self, key: Key) -> None:
        del self._stamp[key]  # its heap or dead entry is stale from now on

    def _begin(self, keys: Sequence[Key]) -> Sequence[float]:
        r = self._cursor
        if r >= len(self._future) or len(self._future[r]) != len(keys):
            raise ConfigError(f"{self.name}: request {r} does not match the sequence given at construction")
        self._cursor = r + 1
        self._current = (keys, self._future[r])
        self._now = None  # built on demand by the generic methods
        return self._future[r]

    def _evict(self, count: int) -> int:
        """Evicts up to `count` best victims, in the order one-at-a-time eviction would pick them;
        returns how many it evicted (fewer when both orders run out of live entries)."""
        stamp_of, keys, stamps = self._stamp, self._dead_keys, self._dead_stamps
        head, end, done = self._head, len(keys), 0
        while done < count and head < end:  # never used again: the least recently used first
            key = keys[head]
            if stamp_of.get(key) == stamps[head]:
                del stamp_of[key]
                done += 1
            head += 1
        self._head = head
        heap = self._heap
        while done < count and heap:  # then the farthest next use
            _, stamp, key = heapq.heappop(heap)
            if stamp_of.get(key) == stamp:
                del stamp_of[key]
                done += 1
        return done

    def replay_request(self, keys: Sequence[Key]) -> int:
        """The hit-only step for the next request of the sequence given at construction.

        Raises:
            ConfigError: more requests replayed than were given, or keys that differ from them.
        """
        future = self._begin(keys)
        stamp_of = self._stamp
        if not self.protect_request:
            hits = self.lookup(keys)
            for key in keys:
                if key not in stamp_of and len(stamp_of) >= self.capacity:
                    victim = self.victim()
                    if victim is None:
                        break
                    self.remove(victim)
                self._touch(key)
            return hits
        return self._replay_protected(keys, future)

    def _replay_protected(self, keys: Sequence[Key], future: Sequence[float]) -> int:
        """The protected step: the request's cached keys are re-stamped (their entries in both
        orders go stale, so none can be a victim) and its new keys inserted, all in one pass; then
        one batch of evictions makes room, and every placed key joins the orders.

        Same effect as evicting before each insertion: the orders do not change while the request
        is served, so the batch picks the same victims; when they run out the request alone fills
        the cache and its last new keys are taken out again. A request of n keys takes stamps
        clock+1..clock+2n: a cached key the one of its position, a new key n more, so the cached
        keys rank as less recent than the new ones and a stamp above clock+n marks a key inserted
        by this request (a repeat of it is skipped).
        """
        stamp_of = self._stamp
        hits = 0
        for key in keys:
            if key not in stamp_of:
                break
            hits += 1
        n = len(keys)
        stamp = self._clock
        inserted_above = stamp + n
        old: list[tuple[Key, float, int]] = []  # (key, next use, stamp), in stamp order
        new: list[tuple[Key, float, int]] = []
        for key, nxt in zip(keys, future):
            stamp += 1
            last = stamp_of.get(key)
            if last is None:
                stamp_of[key] = stamp + n
                new.append((key, nxt, stamp + n))
            elif last <= inserted_above:
                stamp_of[key] = stamp
                old.append((key, nxt, stamp))
        self._clock = stamp + n
        excess = min(len(new), len(stamp_of) - self.capacity)
        if excess > 0:
            short = excess - self._evict(excess)
            if short > 0:  # the request alone fills the cache
                for key, _, _ in new[-short:]:
                    del stamp_of[key]
                del new[-short:]
        dead_keys, dead_stamps, heap = self._dead_keys, self._dead_stamps, self._heap
        for placed in (old, new):
            for key, nxt, stamp in placed:
                if nxt == NEVER:
                    dead_keys.append(key)
                    dead_stamps.append(stamp)
                else:
                    heapq.heappush(heap, (-nxt, stamp, key))
        self._compact()
        return hits


class MinPolicy(BeladyPolicy):
    """Classic MIN at event granularity (see the module docstring)."""

    name = "min"
    granularity = "event"
    protect_request = False


class BeladyBypassPolicy(BeladyPolicy):
    """Prefix-tree Belady that may decline to admit (kvcache-simulator's "optimal", to the digit).

    Differences from `BeladyPolicy`, each one a way a real prefix cache may behave:
    - only leaves are evicted (a prefix outlives its suffixes), the one needed farthest in the
      future first, ties to the key first seen most recently;
    - a key is admitted only when its parent is cached and some evictable leaf is needed later
      than it (otherwise neither it nor the rest of its request is inserted: bypass).
    A cache allowed to refuse keys can do better than forced insertion, so this bounds admission
    filters; DESIGN.md's `belady` inserts every key.
    """

    name = "belady-bypass"

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
        heap, state, kids = self._leaves, self._state, self._kids
        skipped, found = [], None
        while heap:
            neg_next, _, key = heap[0]
            if key not in state or kids[key] or state[key][0] != -neg_next:
                heapq.heappop(heap)
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
