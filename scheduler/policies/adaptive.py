"""ARC and S3-FIFO: the scan-resistant baselines (vLLM kv_offload ships ARC; LMCache ships S3-FIFO).

Primitives:
- `ARCPolicy`: Megiddo & Modha's Adaptive Replacement Cache (FAST 2003): T1 (seen once), T2 (seen
  at least twice), ghost lists B1/B2 of keys evicted from each, and a target size p of T1 that a
  ghost hit moves (B1 hit: p grows by max(1, |B2| // |B1|); B2 hit: p shrinks by max(1, |B1| // |B2|);
  the integer quotient, as most implementations write it, reproduces docs/design.md's reference figures).
  REPLACE evicts T1's oldest when |T1| > p (or |T1| == p and the incoming key is a B2 ghost), else
  T2's oldest. Ghost lists are bounded: |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c.
- `S3FIFOPolicy`: Yang et al., "FIFO queues are all you need for cache eviction" (SOSP 2023): a
  small FIFO S (10% of the capacity), a main FIFO M, a ghost FIFO G of keys evicted from S (as many
  as M holds), and a 2-bit frequency per key (a hit adds 1, at most 3). A new key enters S, or M
  when G remembers it. Evicting: when |S| >= 10% of the capacity, S's oldest moves to M if it was hit
  more than once since it entered (freq > 1, the paper's rule; it keeps its freq) or leaves to G;
  otherwise M's oldest is reinserted with freq - 1 while freq > 0 (CLOCK-like), else evicted.

Protected keys are skipped by `victim` without changing their standing (S3-FIFO rotates them to the
young end of their queue); victim returns None once every key has been seen protected.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.policies.base import Key, Policy, Protected, protector


class ARCPolicy(Policy):
    """Adaptive Replacement Cache (see the module docstring)."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p = 0  # target size of T1
        self._t1: OrderedDict[Key, None] = OrderedDict()
        self._t2: OrderedDict[Key, None] = OrderedDict()
        self._b1: OrderedDict[Key, None] = OrderedDict()
        self._b2: OrderedDict[Key, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def keys(self) -> Iterator[Key]:
        yield from self._t1
        yield from self._t2

    def access(self, key: Key) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def _adapted_p(self, key: Key | None) -> int:
        b1, b2 = len(self._b1), len(self._b2)
        if key is not None and key in self._b1:
            return min(self.capacity, self.p + max(1, b2 // b1))
        if key is not None and key in self._b2:
            return max(0, self.p - max(1, b1 // b2))
        return self.p

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._t1 or key in self._t2:
            raise KeyError(f"{key!r} is already cached")
        if key in self._b1 or key in self._b2:
            self.p = self._adapted_p(key)
            self._b1.pop(key, None)
            self._b2.pop(key, None)
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        """ARC's directory bounds: |T1| + |B1| <= c and all four lists <= 2c."""
        c = self.capacity
        while len(self._t1) + len(self._b1) > c and self._b1:
            self._b1.popitem(last=False)
        while len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c and self._b2:
            self._b2.popitem(last=False)

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        p = self._adapted_p(incoming)
        t1 = len(self._t1)
        prefer_t1 = t1 > 0 and (t1 > p or (incoming is not None and incoming in self._b2 and t1 == p))
        first, second = (self._t1, self._t2) if prefer_t1 else (self._t2, self._t1)
        is_protected = protector(protected)
        for queue in (first, second):
            for key in queue:
                if not is_protected(key):
                    return key
        return None

    def remove(self, key: Key) -> None:
        if key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        else:
            del self._t2[key]
            self._b2[key] = None


class S3FIFOPolicy(Policy):
    """S3-FIFO with a 10% small queue and a ghost queue (see the module docstring).

    Args:
        capacity: keys cached at most.
        small_fraction: the small queue's share of the capacity (0.1 in the paper).
        ghost: the ghost queue's length in multiples of the capacity (the paper: as many keys as M
            holds, 0.9). A longer ghost lets blocks that come back after many requests (the next turn
            of a conversation) enter M directly.
    """

    name = "s3fifo"

    def __init__(self, capacity: int, small_fraction: float = 0.1, ghost: float | None = None) -> None:
        super().__init__(capacity)
        if not 0.0 < small_fraction < 1.0:
            raise ConfigError(f"small_fraction: {small_fraction!r}; expected 0 < f < 1")
        if ghost is not None and not ghost > 0:
            raise ConfigError(f"ghost: {ghost!r}; expected a multiple of the capacity > 0")
        self.small_target = max(1, int(capacity * small_fraction))
        self.ghost_limit = max(1, capacity - self.small_target if ghost is None else round(ghost * capacity))
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def keys(self) -> Iterator[Key]:
        return iter(self._freq)

    def access(self, key: Key) -> None:
        freq = self._freq[key]
        if freq < 3:
            self._freq[key] = freq + 1

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if key in self._freq:
            raise KeyError(f"{key!r} is already cached")
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        is_protected = protector(protected)
        small, main, freq = self._small, self._main, self._freq
        budget = 5 * len(freq) + 5  # a key is rotated at most 3 times for its freq, once promoted, once protected
        small_skips = 0  # protected keys rotated in S: once all were, look at M
        while budget > 0:
            budget -= 1
            if small and small_skips < len(small) and (len(small) >= self.small_target or not main):
                key = next(iter(small))
                if freq[key] > 1:
                    del small[key]
                    main[key] = None
                elif is_protected(key):
                    small.move_to_end(key)
                    small_skips += 1
                else:
                    return key
            elif main:
                key = next(iter(main))
                if freq[key] > 0:
                    freq[key] -= 1
                    main.move_to_end(key)
                elif is_protected(key):
                    main.move_to_end(key)
                else:
                    return key
            else:
                return None
        return None

    def remove(self, key: Key) -> None:
        del self._freq[key]
        if key in self._small:
            del self._small[key]
            self._ghost[key] = None
            while len(self._ghost) > self.ghost_limit:
                self._ghost.popitem(last=False)
        else:
            del self._main[key]


class SuffixARCPolicy(ARCPolicy):
    """kvtier's policy: ARC with a deep ghost history and suffix-first order within a prefix.

    Two changes to ARC, both aimed at prompt-prefix traffic (multi-turn chat, agents):
    - Deep history: the ghost lists remember `history` times the capacity (ARC: 1x). A
      conversation's next turn typically comes back after far more new blocks than a cache holds
      (on the Mooncake trace the median gap is about 420 requests, ~10,000 blocks), so plain ARC
      has forgotten it; remembered, its blocks return straight to T2 (frequent) and the adaptive
      target p learns how much room first-seen prompts deserve. Ghosts are keys only.
    - Suffix-first: the keys of one prefix chain touched in a row (each the child of the previous)
      are re-ordered deepest-oldest when the chain ends, so eviction from either list takes a
      prompt's tail before its head (a cached head still gives hits; a tail without its head never).

    Args:
        capacity: keys cached at most.
        history: ghost history in multiples of the capacity (>= 1).
    """

    name = "suffix-arc"
    uses_parent = True

    def __init__(self, capacity: int, history: int = 6) -> None:
        super().__init__(capacity)
        if not isinstance(history, int) or history < 1:
            raise ConfigError(f"history: {history!r}; expected an int >= 1 (multiples of the capacity)")
        self.history = history
        self._parents: dict[Key, Key | None] = {}
        self._run: list[Key] = []

    def _chain(self, key: Key, parent: Key | None) -> None:
        run = self._run
        if run and (parent is None or run[-1] != parent):
            self._flush()
        run.append(key)

    def _flush(self) -> None:
        t1, t2 = self._t1, self._t2
        for key in reversed(self._run):
            if key in t2:
                t2.move_to_end(key)
            elif key in t1:
                t1.move_to_end(key)
        self._run.clear()

    def access(self, key: Key) -> None:
        super().access(key)
        self._chain(key, self._parents.get(key))

    def insert(self, key: Key, parent: Key | None = None) -> None:
        super().insert(key, parent)
        self._parents[key] = parent
        self._chain(key, parent)

    def _trim_ghosts(self) -> None:
        """Deep history: each ghost list remembers up to `history` x capacity keys."""
        limit = self.history * self.capacity
        while len(self._t1) + len(self._b1) > limit and self._b1:
            self._b1.popitem(last=False)
        while len(self._b2) > limit and self._b2:
            self._b2.popitem(last=False)

    def remove(self, key: Key) -> None:
        super().remove(key)
        del self._parents[key]
