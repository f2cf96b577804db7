"""Belady's offline optimum, the bound beside every hit ratio (it reads the future, so replay only).

Primitives:
- `next_uses(requests, granularity)`: for every key of every request, when it is next used: the
  index of the next request holding it ("request"), or the index of its next occurrence in the flat
  key stream ("event", classic MIN); `NEVER` when it is not used again. One backward pass.
- `BeladyPolicy(capacity, requests)`: replays `requests` in order (its own `replay_request`),
  evicting the key whose next use is farthest in the future, ties to the least recently used, and
  never a key of the request being served (docs/design.md "Hit-ratio semantics").
- `BeladyBypassPolicy` (in `policies.bypass`): the same with bypass, the exact optimum under the
  prefix rule.
- `MinPolicy(capacity, requests)`: classic MIN at event granularity: the farthest next occurrence;
  only the key being inserted is safe, so a request's keys that are not needed again may make room
  for its later keys (hence a slightly higher ratio than request-level Belady).

Two exact orders (no stale entries) hold the cached keys, each least recently accessed first (a
request's cached keys rank before its new ones, each in prompt order):
- keys never used again all tie at "never": a FIFO (a list read from a head index, a set beside
  it for membership). Most victims come from there, and a request's worth of them joins or leaves
  in one slice, with no Python work per key;
- the others sit in buckets by next use (each an `OrderedDict`), the non-empty ones found by a
  max-heap of bucket numbers (lazy: a number whose bucket is gone is skipped). The victim is the
  first key of the farthest bucket. At request r, bucket r holds exactly the request's cached
  keys (every key placed with next use r belongs to request r): taking it out of the orders is
  what protects them.
O(log n) per operation, O(1) for the keys never used again.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from itertools import chain, repeat
from typing import Iterator, Sequence

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.policies.base import Key, Policy, Protected, protector

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
        # keys used again: key -> next use; a bucket per next use (never empty: an emptied one is
        # deleted); a max-heap of -(bucket number) with every bucket's number (and maybe gone ones)
        self._next: dict[Key, float] = {}
        self._buckets: dict[float, OrderedDict[Key, None]] = {}
        self._bucket_heap: list[float] = []
        # keys never used again, least recently used first: `_dead[_head:]`, the same keys as
        # `_dead_set`
        self._dead: list[Key] = []
        self._dead_set: set[Key] = set()
        self._head = 0

    def __len__(self) -> int:
        return len(self._next) + len(self._dead_set)

    def __contains__(self, key: object) -> bool:
        return key in self._next or key in self._dead_set

    def keys(self) -> Iterator[Key]:
        return chain(self._next, self._dead[self._head:])

    def _compact(self) -> None:
        if len(self._bucket_heap) > 2 * len(self._buckets) + 1024:
            self._bucket_heap = [-n for n in self._buckets]
            heapq.heapify(self._bucket_heap)
        if self._head > 2 * self.capacity + 1024:
            del self._dead[:self._head]
            self._head = 0

    def _bucket(self, nxt: float) -> OrderedDict[Key, None]:
        """The bucket of keys next used at `nxt` (created when there is none)."""
        bucket = self._buckets.get(nxt)
        if bucket is None:
            bucket = self._buckets[nxt] = OrderedDict()
            heapq.heappush(self._bucket_heap, -nxt)
        return bucket

    def _take_out(self, key: Key) -> None:
        """Takes a cached key out of the orders (it stays counted in `_next` if used again)."""
        if key in self._dead_set:
            self._dead_set.remove(key)
            i = self._dead.index(key, self._head)  # O(1) at the head, where victims are
            if i == self._head:
                self._head += 1
            else:
                del self._dead[i]
        else:
            nxt = self._next[key]
            bucket = self._buckets.get(nxt)
            if bucket is not None:  # (none: the protected bucket of the request being served)
                del bucket[key]
                if not bucket:
                    del self._buckets[nxt]

    def _touch(self, key: Key) -> None:
        if self._now is None:
            self._now = dict(zip(*self._current))
        nxt = self._now.get(key, NEVER)
        if key in self:
            self._take_out(key)
        if nxt == NEVER:
            self._next.pop(key, None)
            self._dead.append(key)
            self._dead_set.add(key)
        else:
            self._next[key] = nxt
            self._bucket(nxt)[key] = None
        self._compact()

    def access(self, key: Key) -> None:
        if key not in self:
            raise KeyError(key)
        self._touch(key)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self:
            raise KeyError(f"{key!r} is already cached")
        self._touch(key)

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        is_protected = protector(protected)
        dead = self._dead
        for i in range(self._head, len(dead)):  # all tie at "never": the least recently used first
            if not is_protected(dead[i]):
                return dead[i]
        heap, buckets = self._bucket_heap, self._buckets
        skipped = []
        found = None
        while heap and found is None:  # the farthest next use first
            bucket = buckets.get(-heap[0])
            if bucket is not None:
                found = next((key for key in bucket if not is_protected(key)), None)
                if found is None:
                    skipped.append(heapq.heappop(heap))
            else:
                heapq.heappop(heap)  # a bucket that is gone
        for item in skipped:
            heapq.heappush(heap, item)
        return found

    def remove(self, key: Key) -> None:
        if key not in self:
            raise KeyError(key)
        self._take_out(key)
        self._next.pop(key, None)

    def _begin(self, keys: Sequence[Key]) -> Sequence[float]:
        r = self._cursor
        if r >= len(self._future) or len(self._future[r]) != len(keys):
            raise ConfigError(f"{self.name}: request {r} does not match the sequence given at construction")
        self._cursor = r + 1
        self._current = (keys, self._future[r])
        self._now = None  # built on demand by the generic methods
        return self._future[r]

    def _evict(self, count: int) -> int:
        """Evicts up to `count` best victims, in the order that evicting one at a time picks them;
        returns how many (fewer when every cached key is a key of the request being served)."""
        head = self._head
        victims = self._dead[head:head + count]  # never used again: the least recently used first
        self._dead_set.difference_update(victims)
        self._head = head + len(victims)
        done = len(victims)
        next_of, buckets, heap = self._next, self._buckets, self._bucket_heap
        while done < count and heap:  # then the farthest next use, least recently used first
            nxt = -heap[0]
            bucket = buckets.get(nxt)
            if bucket is not None:
                del next_of[bucket.popitem(last=False)[0]]
                done += 1
                if bucket:
                    continue
                del buckets[nxt]
            heapq.heappop(heap)
        return done

    def replay_request(self, keys: Sequence[Key]) -> int:
        """The hit-only step for the next request of the sequence given at construction.

        Raises:
            ConfigError: more requests replayed than were given, or keys that differ from them.
        """
        future = self._begin(keys)
        if not self.protect_request:
            hits = self.lookup(keys)
            for key in keys:
                if key not in self and len(self) >= self.capacity:
                    victim = self.victim()
                    if victim is None:
                        break
                    self.remove(victim)
                self._touch(key)
            return hits
        return self._replay_protected(keys, future)

    def _replay_protected(self, keys: Sequence[Key], future: Sequence[float]) -> int:
        """The protected step, batched per request (the inner loop of every hit-only sweep).

        The request's cached keys leave the orders (bucket r is exactly those used again, so none
        can be a victim); one pass sorts them and the new keys (first occurrences) by next use;
        one batch of evictions makes room for the new keys, picking the victims that evicting
        before each insertion would (the orders do not change while the request is served), and
        when they run out the request alone fills the cache and its last new keys stay out. Then
        every placed key joins the orders: cached keys before new ones, each in prompt order (a
        repeated cached key at its last position), as one key at a time would order them.
        """
        next_of, dead_set = self._next, self._dead_set
        hits = 0
        for key in keys:
            if key not in next_of and key not in dead_set:
                break
            hits += 1
        r = self._cursor - 1
        self._buckets.pop(r, None)
        # keys -> next use, in prompt order (dicts: a repeated key is placed once)
        old_dead: dict[Key, float] = {}  # cached keys of the request never used again
        old_live: dict[Key, float] = {}  # cached keys used again
        new_dead: dict[Key, float] = {}
        new_live: dict[Key, float] = {}
        for key, nxt in zip(keys, future):
            if key in next_of or key in dead_set:
                if next_of.get(key) != r:  # not from bucket r (only after access/insert)
                    self._take_out(key)
                    next_of[key] = r
                placed = old_dead if nxt == NEVER else old_live
                if key in placed:  # a repeat: it ranks at its last position
                    del placed[key]
                placed[key] = nxt
            elif nxt == NEVER:
                new_dead[key] = nxt
            else:
                new_live[key] = nxt
        num_new = len(new_dead) + len(new_live)
        excess = min(num_new, len(next_of) + len(dead_set) - self.capacity + num_new)
        if excess > 0:
            short = excess - self._evict(excess)
            if short > 0:  # the request alone fills the cache: its last `short` new keys stay out
                left_out = [k for k in dict.fromkeys(keys) if k in new_live or k in new_dead][-short:]
                for key in left_out:
                    new_live.pop(key, None)
                    new_dead.pop(key, None)
        for key in old_dead:
            del next_of[key]
        self._dead += old_dead
        self._dead += new_dead
        dead_set.update(old_dead)
        dead_set.update(new_dead)
        buckets = self._buckets
        for placed in (old_live, new_live):
            for key, nxt in placed.items():
                next_of[key] = nxt
                bucket = buckets.get(nxt)
                if bucket is None:
                    bucket = buckets[nxt] = OrderedDict()
                    heapq.heappush(self._bucket_heap, -nxt)
                bucket[key] = None
        self._compact()
        return hits


class MinPolicy(BeladyPolicy):
    """Classic MIN at event granularity (see the module docstring)."""

    name = "min"
    granularity = "event"
    protect_request = False
