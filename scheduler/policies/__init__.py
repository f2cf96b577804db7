"""Eviction policies: one registry from name to class, for the tiers and for replay alike.

Every policy implements `kvtier.scheduler.policies.base.Policy` (access / insert / victim / remove
on hashable keys; pinned keys are passed to `victim` as `protected` and never chosen). The tiers
and `kvtier replay` use these same classes: one implementation, never a simulator copy.

| name | class | idea |
|---|---|---|
| fifo | FIFOPolicy | insertion order |
| lru | LRUPolicy | recency |
| arc | ARCPolicy | recency vs frequency, adaptive (Megiddo & Modha 2003) |
| s3fifo | S3FIFOPolicy | 10% probation FIFO + main FIFO + ghost (Yang et al. 2023) |
| prefix-aware | PrefixAwarePolicy | least recently used *leaf*: a suffix leaves before its prefix |
| cost-aware | CostAwarePolicy | GreedyDual on seconds saved per byte (deeper = dearer), leaves only |
| suffix-arc | SuffixARCPolicy | ours: ARC with deep ghost history and suffix-first order |
| auto | AutoPolicy | the default: follows whichever candidate (LRU, ARC, S3-FIFO, deep-ghost S3-FIFO) its sampled shadow caches score best |
| opt | BeladyBypassPolicy | offline bound: the exact optimum under the prefix rule (request-level Belady with bypass, leaves only) |
| belady | BeladyPolicy | offline reference (not a bound): farthest next request, forced insertion |
| min | MinPolicy | offline reference (not a bound): classic MIN at event granularity |

Primitives: `PolicyName` (the names), `POLICIES` (name -> class), `make_policy`,
`parse_policy_names`, `ONLINE` (the policies a tier may use: no future knowledge).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Sequence

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.policies.adaptive import ARCPolicy, S3FIFOPolicy, SuffixARCPolicy
from kvtier.scheduler.policies.auto import AutoPolicy, RetentionHint
from kvtier.scheduler.policies.base import Key, Policy, Protected, protector
from kvtier.scheduler.policies.basic import FIFOPolicy, LRUPolicy
from kvtier.scheduler.policies.belady import NEVER, BeladyPolicy, MinPolicy, next_uses
from kvtier.scheduler.policies.bypass import BeladyBypassPolicy
from kvtier.scheduler.policies.tree import CostAwarePolicy, PrefixAwarePolicy

__all__ = [
    "ARCPolicy", "AutoPolicy", "BeladyBypassPolicy", "BeladyPolicy", "CostAwarePolicy", "FIFOPolicy", "Key", "LRUPolicy", "MinPolicy", "NEVER",
    "ONLINE", "POLICIES", "Policy", "PolicyName", "PrefixAwarePolicy", "Protected", "RetentionHint", "S3FIFOPolicy",
    "SuffixARCPolicy", "make_policy", "next_uses", "parse_policy_names", "protector",
]


class PolicyName(str, Enum):
    """Registry names of the eviction policies."""

    FIFO = "fifo"
    LRU = "lru"
    ARC = "arc"
    S3FIFO = "s3fifo"
    PREFIX_AWARE = "prefix-aware"
    COST_AWARE = "cost-aware"
    SUFFIX_ARC = "suffix-arc"
    AUTO = "auto"
    OPT = "opt"
    BELADY = "belady"
    MIN = "min"

    @property
    def offline(self) -> bool:
        """True for the policies that read the future (replay only)."""
        return self in (PolicyName.OPT, PolicyName.BELADY, PolicyName.MIN)

    @property
    def is_bound(self) -> bool:
        """True for `opt`, the only offline policy no online policy can beat (the others are references)."""
        return self is PolicyName.OPT


POLICIES: dict[PolicyName, type[Policy]] = {
    PolicyName.FIFO: FIFOPolicy,
    PolicyName.LRU: LRUPolicy,
    PolicyName.ARC: ARCPolicy,
    PolicyName.S3FIFO: S3FIFOPolicy,
    PolicyName.PREFIX_AWARE: PrefixAwarePolicy,
    PolicyName.COST_AWARE: CostAwarePolicy,
    PolicyName.SUFFIX_ARC: SuffixARCPolicy,
    PolicyName.AUTO: AutoPolicy,
    PolicyName.OPT: BeladyBypassPolicy,
    PolicyName.BELADY: BeladyPolicy,
    PolicyName.MIN: MinPolicy,
}

#: the policies a tier may use (no future knowledge)
ONLINE: tuple[PolicyName, ...] = tuple(n for n in PolicyName if not n.offline)

_ALIASES = {"s3-fifo": PolicyName.S3FIFO, "prefix": PolicyName.PREFIX_AWARE, "cost": PolicyName.COST_AWARE,
            "optimal": PolicyName.OPT, "belady-bypass": PolicyName.OPT, "ours": PolicyName.SUFFIX_ARC}


def policy_name(name: str | PolicyName) -> PolicyName:
    """The `PolicyName` for a name or alias (case-insensitive).

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    if isinstance(name, PolicyName):
        return name
    text = str(name).strip().lower()
    try:
        return PolicyName(text)
    except ValueError:
        if text in _ALIASES:
            return _ALIASES[text]
    known = ", ".join(n.value for n in PolicyName)
    raise ConfigError(f"policy: {name!r}; expected one of {known}")


def parse_policy_names(text: str | Sequence[str]) -> list[PolicyName]:
    """Comma-separated (or listed) policy names -> `PolicyName`s, in order, duplicates dropped.

    Raises:
        ConfigError: an empty list or an unknown name.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: list[PolicyName] = []
    for part in parts:
        if str(part).strip():
            name = policy_name(part)
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"policy: {text!r}; expected at least one policy name")
    return names


def make_policy(name: str | PolicyName, capacity: int, **kwargs: Any) -> Policy:
    """A new policy of this name for `capacity` keys (kwargs go to its constructor).

    Offline policies (belady, min) need `requests=` (the whole key sequence to be replayed).

    Raises:
        ConfigError: an unknown name, a bad capacity, or an offline policy without `requests`.
    """
    pname = policy_name(name)
    if pname.offline and "requests" not in kwargs:
        raise ConfigError(f"policy {pname.value!r} reads the future: it needs requests= (replay only)")
    return POLICIES[pname](capacity, **kwargs)
