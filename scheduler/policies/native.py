"""The optional C core of the recency and frequency policies, and how the Python classes reach it.

`kvtier.scheduler.policies._fastpolicy` (built from `_fastpolicy.c` at install when a C compiler is
there; see setup.py) keeps LRU, ARC and S3-FIFO books in C: one key table and intrusive lists over
entry indices, with exactly the behaviour of `LRUPolicy`, `ARCPolicy` and `S3FIFOPolicy` (the same
hits, victims and ghost lists on every sequence of calls; tests/scheduler/policies/test_native.py).
`auto` runs its candidates' books and its shadow caches on it: per access, one table lookup and a few
list moves in C instead of a Python call per candidate. Without the extension (or with
`KVTIER_PURE_POLICIES=1` in the environment, or `set_enabled(False)`), every policy runs its Python
code: the same results, slower.

Primitives: `built()`, `available()`, `set_enabled(flag)`, `lane_spec(policy)`, `make_core(policies, capacity, warm)`,
`NativePolicy` (one policy on the C core, behind the `Policy` interface).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.policies.adaptive import ARCPolicy, S3FIFOPolicy
from kvtier.scheduler.policies.base import Key, Policy, Protected, protector
from kvtier.scheduler.policies.basic import LRUPolicy

try:
    from kvtier.scheduler.policies import _fastpolicy
except ImportError:  # built without a C compiler: the Python classes serve
    _fastpolicy = None

_enabled = os.environ.get("KVTIER_PURE_POLICIES", "0") in ("", "0")


def built() -> bool:
    """True when the C core was built at install (whether or not it is enabled)."""
    return _fastpolicy is not None


def available() -> bool:
    """True when the C core is built and enabled: new policies will use it."""
    return _fastpolicy is not None and _enabled


def set_enabled(flag: bool) -> bool:
    """Lets new policies use the C core (True, the default when built) or not; returns the previous
    setting. Policies already built keep the core they were built with."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def lane_spec(policy: Policy) -> tuple[int, int, int, int]:
    """The C lane of a (fresh) LRU, ARC or S3-FIFO policy: (kind, capacity, small_target, ghost_limit).

    Raises:
        ConfigError: a policy the C core does not implement (subclasses included: they change behaviour).
    """
    if _fastpolicy is None:
        raise ConfigError("the C policy core (_fastpolicy) is not built here")
    kind = type(policy)
    if kind is LRUPolicy:
        return (_fastpolicy.LRU, policy.capacity, 0, 0)
    if kind is ARCPolicy:
        return (_fastpolicy.ARC, policy.capacity, 0, 0)
    if kind is S3FIFOPolicy:
        return (_fastpolicy.S3FIFO, policy.capacity, policy.small_target, policy.ghost_limit)
    raise ConfigError(f"policy {kind.__name__}: the C core implements LRUPolicy, ARCPolicy and S3FIFOPolicy")


def make_core(policies: Sequence[Policy], capacity: int, warm: bool) -> Any:
    """A C core with one lane per policy (`_fastpolicy.Core`; see _fastpolicy.c for its methods).

    Args:
        policies: fresh policies whose behaviour the lanes copy (`lane_spec`).
        capacity: the cache's capacity (the synced lanes' `step` evicts above it).
        warm: True: one recency queue with hit counts stands for every lane until the first victim.
    """
    return _fastpolicy.Core([lane_spec(p) for p in policies], capacity, warm)


class NativePolicy(Policy):
    """One LRU, ARC or S3-FIFO policy on the C core, behind the `Policy` interface.

    Args:
        template: a fresh `LRUPolicy`, `ARCPolicy` or `S3FIFOPolicy` whose behaviour (and parameters:
            capacity, small queue, ghost length) this one has.
    """

    def __init__(self, template: Policy) -> None:
        super().__init__(template.capacity)
        self._core = make_core([template], template.capacity, warm=False)
        self.name = template.name

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, key: object) -> bool:
        return key in self._core

    def keys(self) -> Iterator[Key]:
        return iter(self._core.keys())

    @property
    def p(self) -> int:
        """ARC's target size of T1 (0 for the other kinds)."""
        return self._core.p(0)

    def access(self, key: Key) -> None:
        self._core.access(key)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        self._core.insert(key)

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        return self._core.victim(0, None if protected is None else protector(protected), incoming)

    def remove(self, key: Key) -> None:
        self._core.remove(key)

    def lookup(self, keys: Sequence[Key]) -> int:
        return self._core.lookup(keys)

    def replay_request(self, keys: Sequence[Key]) -> int:
        return self._core.replay(keys)[0]
