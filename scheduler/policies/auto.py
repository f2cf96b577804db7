"""`auto`: the default policy. It follows, online, whichever of several candidate policies is doing best.

No single eviction policy wins on every trace: recency (LRU) wins on chat at large caches, frequency
(ARC, S3-FIFO) on document Q&A, and a long ghost history on conversations that come back after many
requests. `auto` runs every candidate on the real cache's books (each sees the same access /
insert / remove calls) and asks the current *leader* for the victim. Which candidate leads is decided
by small spatially sampled shadow caches (SHARDS, Waldspurger et al. 2015): a key is sampled when a
stable hash of it falls under the sampling rate R; each candidate also runs alone on a shadow cache
of R x capacity fed only the sampled keys of each request (the prefix rule applied to the sampled
subsequence), and the candidate whose shadow scored the most (exponentially decayed) hits leads.
Everything is learned from the request stream as it is served: nothing from the future, nothing tuned
to a trace. Since LRU, ARC and S3-FIFO are themselves candidates, `auto` cannot fall far below the
best of them; the S3-FIFO with a deep ghost (4x the capacity) is what wins on conversations.

Two prefix-rule refinements apply whichever candidate leads (`replay_request`, the hit-only step):
a request's blocks are refreshed and inserted deepest first, so in every candidate's order a prompt's
tail ranks older than its head (a cached head still gives hits, a tail without its head never does);
and a prompt's partial last block, which the next turn of a conversation rewrites (hence rehashes),
is released to go first when the caller says it is partial.

Hints (`RetentionHint`, optional): blocks of a session that will not continue (or of a request with
negative priority) that no other session inserted become the first victims, whatever the leader says.

Primitives: `AutoPolicy`, `CANDIDATES` (name -> factory), `RetentionHint`, `stable_hash`.
Cost: O(1) amortised per access per candidate (each candidate's own cost), plus R of that for the
shadows. With the C core (`kvtier.scheduler.policies.native`, built at install) the candidates' books,
the released keys and the shadows live in C: one key-table lookup and a few list moves per access and
candidate, and one call per request for the hit-only step and one for the shadows; without it, the
same behaviour in Python. Invariants: the candidates hold exactly the cache's keys; a victim is never
protected.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.policies import native
from kvtier.scheduler.policies.adaptive import ARCPolicy, S3FIFOPolicy
from kvtier.scheduler.policies.base import Key, Policy, Protected, protector
from kvtier.scheduler.policies.basic import LRUPolicy

_MASK = (1 << 64) - 1
#: the owner of a key that several sessions' requests held
_SHARED = object()
_GOLDEN = 0x9E3779B97F4A7C15
#: 1 / SAMPLE_SPACE is the finest sampling rate
SAMPLE_SPACE = 1 << 12


def stable_hash(key: Hashable) -> int:
    """A hash of a block key that does not depend on PYTHONHASHSEED (ints and bytes; others by str)."""
    if isinstance(key, int):
        x = key & _MASK
    elif isinstance(key, (bytes, bytearray, memoryview)):
        x = int.from_bytes(bytes(key[:8]).ljust(8, b"\0"), "little")
    else:
        x = int.from_bytes(str(key).encode()[:8].ljust(8, b"\0"), "little")
    x = (x * _GOLDEN) & _MASK
    return (x ^ (x >> 29)) & _MASK


def _deep_s3fifo(capacity: int) -> Policy:
    return S3FIFOPolicy(capacity, ghost=4.0)


#: the candidates `auto` chooses among, in order of preference when they tie; LRU first: until the
#: shadows tell the candidates apart (and while they tie), the plain recency order leads, which loses
#: nothing where the cache holds nearly the whole working set (there LRU is optimal)
CANDIDATES: dict[str, Callable[[int], Policy]] = {
    "lru": LRUPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "s3fifo-deep": _deep_s3fifo,
}


@dataclass(frozen=True, slots=True)
class RetentionHint:
    """What an engine may say about a request's blocks (all optional).

    Attributes:
        session: the conversation or agent the request belongs to.
        continues: False when the session ends with this request (its private blocks will not be
            needed again); True or None: unknown or continuing.
        priority: negative: the request's private blocks go first; 0 (default) or positive: normal.
    """

    session: str | None = None
    continues: bool | None = None
    priority: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> "RetentionHint | None":
        """The hint in a request's parameters (vLLM's `kv_transfer_params`): keys `session` (str),
        `continues` (bool) and `priority` (int), all optional; None when none is there.

        Raises:
            ConfigError: a key of the wrong type (the message names it, its value and the type expected).
        """
        if not params:
            return None
        session, continues, priority = params.get("session"), params.get("continues"), params.get("priority", 0)
        if session is None and continues is None and not priority:
            return None
        if session is not None and not isinstance(session, (str, int)):
            raise ConfigError(f"kv_transfer_params.session: {session!r:.40}; expected a string")
        if continues is not None and not isinstance(continues, bool):
            raise ConfigError(f"kv_transfer_params.continues: {continues!r:.40}; expected true or false")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigError(f"kv_transfer_params.priority: {priority!r:.40}; expected an int")
        return cls(None if session is None else str(session), continues, priority)

    @property
    def releases(self) -> bool:
        """True when the request's private blocks should be the first victims."""
        return self.continues is False or self.priority < 0


class AutoPolicy(Policy):
    """Follow-the-leader over candidate policies judged by sampled shadow caches (module docstring).

    Args:
        capacity: keys cached at most.
        candidates: candidate names from `CANDIDATES` (default all).
        min_shadow: the smallest shadow capacity in keys: the sampling rate is
            max(1/64, min(1, min_shadow / capacity)) (rounded to 1/SAMPLE_SPACE).
        half_life: requests after which a shadow hit counts half (the memory of the comparison).
        margin: a challenger leads once its score exceeds the leader's by `margin` standard
            deviations (Poisson, sqrt of the leader's score); 0 (default): as soon as it is ahead.
    """

    name = "auto"

    def __init__(self, capacity: int, candidates: Sequence[str] | None = None, min_shadow: int = 1024,
                 half_life: int = 500, margin: float = 0.0) -> None:
        super().__init__(capacity)
        names = list(candidates) if candidates is not None else list(CANDIDATES)
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown or not names:
            raise ConfigError(f"candidates: {names!r}; expected names from {', '.join(CANDIDATES)}")
        if not isinstance(min_shadow, int) or min_shadow < 1:
            raise ConfigError(f"min_shadow: {min_shadow!r}; expected an int >= 1")
        if not margin >= 0:
            raise ConfigError(f"margin: {margin!r}; expected a number >= 0")
        if not isinstance(half_life, int) or half_life < 1:
            raise ConfigError(f"half_life: {half_life!r}; expected an int >= 1 (requests)")
        self.candidate_names = tuple(names)
        #: the candidates' books of the cache, built when the cache first needs a victim; until then
        #: every candidate would hold the same keys, so one recency order with hit counts stands for
        #: them (cheap while a tier is filling, and for tiers that never fill)
        self._real: list[Policy] | None = None
        self._warm: OrderedDict[Key, int] | None = OrderedDict()
        rate = max(1.0 / 64, min(1.0, min_shadow / capacity))
        self._threshold = max(1, round(rate * SAMPLE_SPACE))
        self.sampling_rate = self._threshold / SAMPLE_SPACE
        shadow_capacity = max(1, round(capacity * self.sampling_rate))
        self._shadows = [CANDIDATES[n](shadow_capacity) for n in names]
        self._scores = [0.0] * len(names)
        self._gain = 1.0
        self._decay = 0.5 ** (1.0 / half_life)
        self.margin = margin
        self.leader = 0
        self._sampled: dict[Key, bool] = {}
        self._released: OrderedDict[Key, None] = OrderedDict()
        self._owner: dict[Key, object] = {}
        #: the C core's books of every candidate (with the warm-up and released keys) and shadows, or
        #: None: the Python objects above keep them
        self._core = self._shadow_core = None
        if native.available():
            self._core = native.make_core([CANDIDATES[n](capacity) for n in names], capacity, warm=True)
            self._shadow_core = native.make_core(self._shadows, shadow_capacity, warm=False)
            self._shadow_core.scoring(self._threshold, SAMPLE_SPACE, self._decay, margin, stable_hash)
            self._shadows, self._warm = [], None
            # the per-block calls of the tiers and the simulation go straight to C (no Python frame)
            self.access, self.insert = self._core.access, self._core.insert
            self.remove = self._core.remove  # until a hint gives keys owners (`hint`)

    # -- books ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        if self._core is not None:
            return len(self._core)
        return len(self._warm) if self._warm is not None else len(self._real[0])

    def __contains__(self, key: object) -> bool:
        if self._core is not None:
            return key in self._core
        return key in self._warm if self._warm is not None else key in self._real[0]

    def keys(self) -> Iterator[Key]:
        if self._core is not None:
            return iter(self._core.keys())
        return iter(self._warm) if self._warm is not None else self._real[0].keys()

    @property
    def leader_name(self) -> str:
        """The candidate whose victims the cache takes now."""
        return self.candidate_names[self.leader]

    def _books(self) -> list[Policy]:
        """The candidates' books, built on first use from the warm-up order (oldest first), each key
        inserted then hit as often as it was (at most 3 times: what frequency policies tell apart)."""
        if self._real is None:
            self._real = [CANDIDATES[n](self.capacity) for n in self.candidate_names]
            for policy in self._real:
                for key, hits in self._warm.items():
                    policy.insert(key, None)
                    for _ in range(min(hits, 3)):
                        policy.access(key)
            self._warm = None
        return self._real

    def lookup(self, keys: Sequence[Key]) -> int:
        if self._core is not None:
            return self._core.lookup(keys)
        return super().lookup(keys)

    def access(self, key: Key) -> None:
        if self._core is not None:
            self._core.access(key)
            return
        warm = self._warm
        if warm is not None:
            warm[key] += 1
            warm.move_to_end(key)
        else:
            for policy in self._real:
                policy.access(key)
        if self._released:
            self._released.pop(key, None)

    def insert(self, key: Key, parent: Key | None = None) -> None:
        if self._core is not None:
            self._core.insert(key)
        elif self._warm is not None:
            if key in self._warm:
                raise KeyError(f"{key!r} is already cached")
            self._warm[key] = 0
        else:
            for policy in self._real:
                policy.insert(key, parent)

    def victim(self, protected: Protected = None, incoming: Key | None = None) -> Key | None:
        if self._core is not None:
            return self._core.victim(self.leader, None if protected is None else protector(protected), incoming)
        if self._released:
            is_protected = protector(protected)
            for key in self._released:
                if not is_protected(key):
                    return key
        return self._books()[self.leader].victim(protected, incoming)

    def remove(self, key: Key) -> None:
        if self._core is not None:
            self._core.remove(key)
        elif self._warm is not None:
            del self._warm[key]
        else:
            for policy in self._real:
                policy.remove(key)
        if self._released:
            self._released.pop(key, None)
        if self._owner:
            self._owner.pop(key, None)

    # -- learning ---------------------------------------------------------------------------------

    def _is_sampled(self, key: Key) -> bool:
        sampled = self._sampled.get(key)
        if sampled is None:
            sampled = stable_hash(key) % SAMPLE_SPACE < self._threshold
            if len(self._sampled) > 16 * self.capacity + 4096:
                self._sampled.clear()  # a memo only: recomputed on demand
            self._sampled[key] = sampled
        return sampled

    def observe(self, keys: Sequence[Key]) -> None:
        """Feeds one request's keys (prompt order) to the shadow caches and updates the leader."""
        if self._shadow_core is not None:
            self.leader = self._shadow_core.observe(keys, self.leader)
            return
        sampled = [k for k in keys if self._is_sampled(k)] if self._threshold < SAMPLE_SPACE else list(keys)
        self._gain /= self._decay
        if not sampled:
            return
        scores, gain = self._scores, self._gain
        for i, shadow in enumerate(self._shadows):
            hits = shadow.replay_request(sampled)
            if hits:
                scores[i] += hits * gain
        if gain > 1e100:  # renormalise the decayed scores
            self._scores = scores = [s / gain for s in scores]
            self._gain = 1.0
        best = max(range(len(scores)), key=scores.__getitem__)
        lead = scores[self.leader]
        if scores[best] > lead + self.margin * math.sqrt(lead * gain):
            self.leader = best

    def hint(self, keys: Sequence[Key], hint: RetentionHint | None) -> None:
        """Applies a request's retention hint once its blocks are placed (cached keys only).

        A cached key belongs to the session that placed it until another session's request holds it
        too (then it is shared: a system prompt, a document). When the hint says the session ends (or
        the priority is negative), the keys that belong to its session become first victims.
        """
        if hint is None:
            return
        session = hint.session if hint.session is not None else ""
        self.__dict__.pop("remove", None)  # from now on a removal also forgets the key's owner
        owner = self._owner
        mine = []
        for key in keys:
            if key not in self:
                continue
            first = owner.setdefault(key, session)
            if first == session:
                mine.append(key)
            elif first is not _SHARED:
                owner[key] = _SHARED
        if hint.releases:
            for key in reversed(mine):  # deepest first: no block outlives its prefix
                if self._core is not None:
                    self._core.release(key)
                else:
                    self._released[key] = None

    def replay_request(self, keys: Sequence[Key], hint: RetentionHint | None = None,
                       partial_last: bool = False) -> int:
        """The hit-only step, suffix first; then the shadows learn from the request.

        Hits are the leading cached keys, as for every policy. Then the request's cached keys are
        refreshed and its new keys inserted deepest first, so that within one request a prompt's
        tail ranks older than its head in every candidate's order (a cached head still gives hits, a
        tail without its head never does); the request's last block, when `partial_last` (the partial
        block that the next turn of a conversation extends, hence rehashes), becomes a first victim.
        """
        if self._core is not None:
            out = [] if self._owner else None
            hits = self._core.step(keys, self.leader, partial_last, out)
            for key in out or ():
                self._owner.pop(key, None)
            self.leader = self._shadow_core.observe(keys, self.leader)
            if hint is not None:
                self.hint(keys, hint)
            return hits
        hits = self.lookup(keys)
        new = []
        for i in range(len(keys) - 1, -1, -1):
            key = keys[i]
            if key in self:
                self.access(key)
            else:
                new.append(key)
        for key in new:
            if len(self) >= self.capacity:
                victim = self.victim(None, key)
                if victim is None:
                    break
                self.remove(victim)
            self.insert(key, None)
        self.observe(keys)
        if partial_last and keys and keys[-1] in self:
            self._released[keys[-1]] = None
        if hint is not None:
            self.hint(keys, hint)
        return hits
