"""The eviction-policy interface every kvtier policy implements, and the hit-only request step.

A policy keeps the books of one fixed-size cache of hashable keys (trace ids in replay, 16-byte
`BlockKey`s in a tier) and decides which key leaves when the cache is full. It never stores
payloads and never evicts on its own: the caller asks for a `victim`, removes it, then inserts.

Primitives (all O(1) or O(log n) amortised per call):
- `access(key)`: a hit; refresh the key's standing.
- `insert(key, parent=None)`: a new key (the caller made room first); `parent` is the key of the
  previous block of the same prefix (None for a first block), used by prefix-aware policies.
- `victim(protected=None, incoming=None)`: the key to evict next, never one that `protected`
  holds (a set/container or a predicate: pinned blocks, the request being served), or None when
  every key is protected. `incoming` is the key about to be inserted (ARC adapts on ghost hits).
  May reorganise internal queues (S3-FIFO promotes), never removes a key.
- `remove(key)`: the key left the cache (evicted or dropped); policies with ghost history remember it.
- `__len__`, `__contains__`, `keys()`.

`Policy.replay_request(keys)` is the hit-only step of docs/design.md "Hit-ratio semantics", built on
the primitives (a subclass may override it with a faster loop that keeps exactly the same effect):
hits are the leading keys found; then every key is refreshed or inserted in prompt order, each
insertion evicting `victim()` first when the cache is full. Nothing is protected here, so a request
longer than the cache (or a FIFO-like policy) may push out its own earlier keys, as a real cache that
fills while a long prompt streams in would; this reproduces docs/design.md's reference ARC and S3-FIFO
figures exactly. Belady, an offline bound, overrides the step and never evicts a key of the request
being served.

Invariants: `len(policy) <= capacity` whenever the caller evicts before inserting; a protected key
is never returned by `victim`.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Container, Hashable, Iterator, Sequence

from kvtier.tiers.errors import ConfigError

Key = Hashable
#: what `victim` must not return: a container of keys, a predicate, or None (nothing protected)
Protected = Container[Any] | Callable[[Any], bool] | None


def protector(protected: Protected) -> Callable[[Any], bool]:
    """A predicate `is_protected(key)` for any accepted form of `protected`."""
    if protected is None:
        return _never
    if callable(protected) and not hasattr(protected, "__contains__"):
        return protected
    return protected.__contains__


def _never(_key: Any) -> bool:
    return False


def heap_victim(heap: list, is_stale: Callable[[tuple], bool], is_protected: Callable[[Any], bool]) -> Any:
    """The key of the best entry of a lazy-deletion heap of `(priority, tiebreak, key)` that is neither
    stale (popped for good) nor protected (set aside and pushed back), or None."""
    skipped, found = [], None
    while heap:
        entry = heap[0]
        if is_stale(entry):
            heapq.heappop(heap)
            continue
        if is_protected(entry[2]):
            skipped.append(heapq.heappop(heap))
            continue
        found = entry[2]
        break
    for entry in skipped:
        heapq.heappush(heap, entry)
    return found


class Policy(ABC):
    """Base of every eviction policy; see the module docstring for the contract.

    Args:
        capacity: the number of keys the cache holds at most (>= 1).
    """

    #: registry name (`kvtier.scheduler.policies.PolicyName`)
    name: ClassVar[str] = ""
    #: True when the policy needs each key's parent (prefix-aware policies)
    uses_parent: ClassVar[bool] = False

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError(f"capacity: {capacity!r}; expected an int >= 1 (blocks)")
        self.capacity = capacity

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def keys(self) -> Iterator[Key]:
        """The cached keys (order unspecified)."""

    @abstractmethod
    def access(self, key: Key) -> None:
        """Records a hit on a cached key."""

    @abstractmethod
    def insert(self, key: Key, parent: Key | None = None) -> None:
        """Adds a key that is not cached; the caller has made room (len < capacity)."""

    @abstractmethod
    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        """The key to evict next (not removed), or None when every cached key is protected."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """Forgets a cached key (after eviction or an explicit drop). Raises KeyError if absent."""

    def evict(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        """`victim` then `remove`: returns the evicted key, or None when nothing may be evicted."""
        key = self.victim(protected, incoming)
        if key is not None:
            self.remove(key)
        return key

    def lookup(self, keys: Sequence[Key]) -> int:
        """How many leading keys are cached (stops at the first miss); changes nothing."""
        return leading_hits(self, keys)

    def replay_request(self, keys: Sequence[Key]) -> int:
        """One hit-only request (module docstring): returns its number of leading hits."""
        hits = self.lookup(keys)
        parent = None
        for key in keys:
            if key in self:
                self.access(key)
            else:
                if len(self) >= self.capacity:
                    victim = self.victim(None, key)
                    if victim is None:
                        break
                    self.remove(victim)
                self.insert(key, parent)
            parent = key
        return hits

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity}, size={len(self)})"


def leading_hits(cached: Container[Key], keys: Sequence[Key]) -> int:
    """How many leading `keys` are in `cached` (the prefix rule: stops at the first miss)."""
    n = 0
    for key in keys:
        if key not in cached:
            break
        n += 1
    return n
