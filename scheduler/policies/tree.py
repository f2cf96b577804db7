"""Prefix-tree policies: evict suffixes first, so no block is kept while its prefix is gone.

A lookup walks keys until the first miss, so a cached block whose parent was evicted can never be
hit: it only wastes a slot. These policies know each key's parent (`insert(key, parent)`) and
only ever choose a *leaf* (a cached key with no cached child), as SGLang's radix cache does: a
heap of leaves, stale entries skipped, a parent pushed once its last child leaves.

Primitives:
- `PrefixAwarePolicy`: the least recently used leaf.
- `CostAwarePolicy`: GreedyDual over leaves: priority = L + value(key, depth), where value is the
  caller's estimate of the seconds of recompute a hit saves per byte kept (deeper blocks cost more
  to recompute: attention grows with position), and L (the inflation) is the priority of the last
  victim, so keys that are not used again age out. Default value: depth + 1.

Invariants: `victim` returns a leaf that is not protected; a key's depth is its parent's + 1 (0 for
a key inserted without a cached parent); removing an inner key (an explicit drop) makes its
children roots.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Iterator

from kvtier.scheduler.policies.base import Key, Policy, Protected, heap_victim, protector

#: value(key, depth) -> seconds saved per byte when the key is hit
ValueFn = Callable[[Key, int], float]


class _LeafHeapPolicy(Policy):
    """Leaf-only eviction in priority order (lowest first); subclasses define `_priority`."""

    uses_parent = True

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._parent: dict[Key, Key | None] = {}
        self._children: dict[Key, set[Key]] = {}
        self._depth: dict[Key, int] = {}
        self._prio: dict[Key, float] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = itertools.count()

    def _priority(self, key: Key, hit: bool) -> float:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, key: object) -> bool:
        return key in self._parent

    def keys(self) -> Iterator[Key]:
        return iter(self._parent)

    def depth(self, key: Key) -> int:
        """The key's depth in the prefix tree of cached keys (0 for a root)."""
        return self._depth[key]

    def _push(self, key: Key) -> None:
        heapq.heappush(self._heap, (self._prio[key], next(self._seq), key))
        if len(self._heap) > 4 * self.capacity + 1024:
            self._heap = [(p, next(self._seq), k) for k, p in self._prio.items() if not self._children.get(k)]
            heapq.heapify(self._heap)

    def access(self, key: Key) -> None:
        if key not in self._parent:
            raise KeyError(key)
        self._prio[key] = self._priority(key, True)
        if not self._children.get(key):
            self._push(key)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._parent:
            raise KeyError(f"{key!r} is already cached")
        if parent is not None and parent not in self._parent:
            parent = None  # its prefix is not cached: a root (a lookup cannot reach it anyway)
        self._parent[key] = parent
        self._depth[key] = 0 if parent is None else self._depth[parent] + 1
        if parent is not None:
            self._children.setdefault(parent, set()).add(key)
        self._prio[key] = self._priority(key, False)
        self._push(key)

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        is_protected = protector(protected)
        prio, children = self._prio, self._children
        # stale: re-prioritised, removed, or no longer a leaf
        return heap_victim(self._heap, lambda e: prio.get(e[2]) != e[0] or children.get(e[2]), is_protected)

    def remove(self, key: Key) -> None:
        parent = self._parent.pop(key)
        del self._prio[key]
        del self._depth[key]
        for child in self._children.pop(key, ()):
            self._parent[child] = None
        if parent is not None:
            siblings = self._children[parent]
            siblings.discard(key)
            if not siblings:
                del self._children[parent]
                self._push(parent)  # the parent is a leaf now


class PrefixAwarePolicy(_LeafHeapPolicy):
    """The least recently used leaf of the prefix tree (suffixes leave before their prefix)."""

    name = "prefix-aware"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._clock = 0

    def _priority(self, key: Key, hit: bool) -> float:
        self._clock += 1
        return self._clock


class CostAwarePolicy(_LeafHeapPolicy):
    """GreedyDual over the leaves, valued by seconds of recompute saved per byte (module docstring).

    Args:
        capacity: keys cached at most.
        value: value(key, depth) -> seconds saved per byte by a hit (the planner's cost model);
            default depth + 1 (recompute cost grows with position).
    """

    name = "cost-aware"

    def __init__(self, capacity: int, value: ValueFn | None = None) -> None:
        super().__init__(capacity)
        self._value = value or (lambda key, depth: depth + 1.0)
        self.inflation = 0.0

    def _priority(self, key: Key, hit: bool) -> float:
        return self.inflation + float(self._value(key, self._depth[key]))

    def remove(self, key: Key) -> None:
        # GreedyDual: L rises to the priority of what leaves, so what stays must be refreshed to stay
        self.inflation = max(self.inflation, self._prio.get(key, self.inflation))
        super().remove(key)
