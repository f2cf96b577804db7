"""Hit-only replay: prefix hit ratios of a trace under each policy and capacity, with their bounds.

Semantics (docs/design.md "Hit-ratio semantics"): one trace id is one block; a request's hits are its
leading ids found in the cache, stopping at the first miss; then every id of the request is
refreshed or inserted in prompt order (`Policy.replay_request`); the ratio is hits over all ids of
the measured requests. `Weight.TOKENS` weights each block by its tokens (full blocks
`block_tokens`, the last what is left, as kvcache-simulator does); a warm-up fraction F measures
only the last 1 - F of the requests (the first floor(n * F) still fill the cache).

Primitives: `Weight`, `HitOnlyWorkload.from_requests` (keys, weights, measured window: built once,
shared by every run), `run_policy`, `infinite_ratio`, `sweep` (capacities x policies, plus the
infinite bound, the `opt` bound and the Belady / classic MIN references at each capacity),
`HitOnlyResult`. Only `opt` and the infinite cache are bounds: forced-insertion Belady and classic MIN
are references that online policies can beat under the prefix rule.

The policies are `kvtier.scheduler.policies` (the tiers' own classes). Nothing here imports torch.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Hashable, Sequence

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.policies import AutoPolicy, PolicyName, RetentionHint, make_policy, next_uses, policy_name
from kvtier.scheduler.replay.traces import Request, block_weights

#: progress(done, total, label)
Progress = Callable[[int, int, str], None]


class Weight(str, Enum):
    """What one hit counts for."""

    BLOCKS = "blocks"
    TOKENS = "tokens"


def request_keys(request: Request) -> tuple[Hashable, ...]:
    """The block keys of a request: its trace ids, or the chained keys of its full token blocks."""
    if request.block_ids is not None:
        return request.block_ids
    from kvtier.tiers.keys import chain_keys, namespace  # numpy, only for token-id traces

    ns = namespace(bytes(16), b"trace")
    return tuple(chain_keys(list(request.token_ids or ()), request.block_tokens, ns))


@dataclass(frozen=True, slots=True)
class HitOnlyWorkload:
    """A trace prepared for hit-only runs.

    Attributes:
        keys: per request, its block keys in prompt order.
        weights: per request, each block's weight (tokens), or None when every block counts 1.
        start: index of the first measured request (the warm-up requests before it only fill).
        total: the measured weight (blocks or tokens) of all measured requests.
        partial_last: per request, whether its last key is a partial block (the next turn of a
            conversation rewrites it, so `auto` lets it go first).
        hints: per request, its retention hint (`RetentionHint`: session, continues, priority) for
            the policies that take hints (`auto`); None when hints are off.
    """

    keys: list[tuple[Hashable, ...]]
    weights: list[tuple[int, ...]] | None
    start: int
    total: float
    hints: list[RetentionHint] | None = None
    partial_last: list[bool] | None = None

    @classmethod
    def from_requests(cls, requests: Sequence[Request], weight: Weight | str = Weight.BLOCKS,
                      warmup_fraction: float = 0.0, hints: bool = False) -> "HitOnlyWorkload":
        """Keys, weights and measured window of `requests` (and their retention hints when `hints`).

        Raises:
            ConfigError: warmup_fraction outside [0, 1), an unknown weight, or no block to measure.
        """
        if not 0.0 <= warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction: {warmup_fraction!r}; expected 0 <= F < 1")
        try:
            weight = Weight(weight)
        except ValueError:
            raise ConfigError(f"weight: {weight!r}; expected 'blocks' or 'tokens'") from None
        keys = [request_keys(r) for r in requests]
        start = min(len(requests), math.floor(len(requests) * warmup_fraction))
        weights = None
        if weight is Weight.TOKENS:
            weights = []
            for r, k in zip(requests, keys):
                if r.block_ids is not None:
                    weights.append(tuple(block_weights(r.input_tokens, len(k), r.block_tokens)))
                else:
                    weights.append((r.block_tokens,) * len(k))
            total = float(sum(sum(w) for w in weights[start:]))
        else:
            total = float(sum(len(k) for k in keys[start:]))
        if total <= 0:
            raise ConfigError("trace: no block in the measured requests (all prompts shorter than a block?)")
        hint_list = [RetentionHint(r.session, r.continues, r.priority) for r in requests] if hints else None
        partial = [r.block_ids is not None and r.input_tokens % r.block_tokens != 0 for r in requests]
        return cls(keys, weights, start, total, hint_list, partial)

    @property
    def num_requests(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class HitOnlyResult:
    """One (policy, capacity) run: measured hits and total, and how long it took."""

    policy: str
    cache_blocks: int
    hits: float
    total: float
    seconds: float

    @property
    def block_hit_ratio(self) -> float:
        return self.hits / self.total if self.total else 0.0


def run_policy(work: HitOnlyWorkload, name: str | PolicyName, capacity: int,
               future: Sequence[tuple[float, ...]] | None = None) -> HitOnlyResult:
    """Replays the workload through a new policy of `capacity` blocks.

    Args:
        future: for belady/min, `next_uses(work.keys, granularity)` if already computed.
    """
    pname = policy_name(name)
    start_s = time.perf_counter()
    if pname.offline:
        policy = make_policy(pname, capacity, requests=work.keys, future=future)
    else:
        policy = make_policy(pname, capacity)
    step = policy.replay_request
    if isinstance(policy, AutoPolicy):
        extras = zip(work.hints or [None] * len(work.keys), work.partial_last or [False] * len(work.keys))

        def step(keys: tuple[Hashable, ...], _replay=policy.replay_request, _extras=iter(extras)) -> int:
            hint, partial = next(_extras)
            return _replay(keys, hint, partial)
    keys, weights, start = work.keys, work.weights, work.start
    for r in range(start):
        step(keys[r])
    hits = 0.0
    if weights is None:
        for r in range(start, len(keys)):
            hits += step(keys[r])
    else:
        for r in range(start, len(keys)):
            h = step(keys[r])
            if h:
                hits += sum(weights[r][:h])
    return HitOnlyResult(pname.value, capacity, hits, work.total, time.perf_counter() - start_s)


def infinite_ratio(work: HitOnlyWorkload) -> float:
    """The hit ratio of an unbounded cache (every id ever seen stays)."""
    seen: set[Hashable] = set()
    hits = 0.0
    for r, keys in enumerate(work.keys):
        h = 0
        for key in keys:
            if key not in seen:
                break
            h += 1
        if r >= work.start and h:
            hits += h if work.weights is None else sum(work.weights[r][:h])
        seen.update(keys)
    return hits / work.total


@dataclass(frozen=True, slots=True)
class SweepResult:
    """Every run of a sweep and the bounds at each capacity."""

    results: list[HitOnlyResult]
    infinite: float
    belady: dict[int, float]
    min: dict[int, float]
    seconds: float
    opt: dict[int, float] = field(default_factory=dict)


#: what a forked worker inherits: the workload and the offline policies' futures
_FORKED: tuple[HitOnlyWorkload, dict] | None = None


def _run_forked(task: tuple[int, PolicyName]) -> HitOnlyResult:
    assert _FORKED is not None, "worker started without a workload"
    work, futures = _FORKED
    return run_policy(work, task[1], task[0], futures.get(task[1]))


def sweep(work: HitOnlyWorkload, capacities: Sequence[int], policies: Sequence[str | PolicyName],
          bounds: Sequence[str] = ("opt",), progress: Progress | None = None, jobs: int = 1) -> SweepResult:
    """Runs every policy at every capacity, and the bound "opt" and references "belady", "min" at each capacity.

    Args:
        jobs: worker processes (forked, so the workload is shared copy-on-write); 1 runs in this
            process. Runs are independent, so the results do not depend on it.

    Raises:
        ConfigError: a capacity < 1, an unknown policy or bound.
    """
    start_s = time.perf_counter()
    names = [policy_name(p) for p in policies]
    for c in capacities:
        if not isinstance(c, int) or c < 1:
            raise ConfigError(f"cache_blocks: {c!r}; expected ints >= 1")
    bound_names = [policy_name(b) for b in bounds]
    for b in bound_names:
        if b not in (PolicyName.OPT, PolicyName.BELADY, PolicyName.MIN):
            raise ConfigError(f"bounds: {b.value!r}; expected opt, belady, min or none")
    futures: dict[PolicyName, list] = {}

    def future(p: PolicyName) -> list | None:
        if not p.offline:
            return None
        if p not in futures:
            futures[p] = next_uses(work.keys, "event" if p is PolicyName.MIN else "request")
        return futures[p]

    todo = [(c, p) for c in capacities for p in names]
    todo += [(c, b) for c in capacities for b in bound_names if b not in names]
    done: dict[tuple[int, PolicyName], HitOnlyResult] = {}
    infinite = None
    if jobs > 1 and len(todo) > 1 and "fork" in multiprocessing.get_all_start_methods():
        global _FORKED
        for _, p in todo:
            future(p)  # once, before the fork: every worker shares it
        _FORKED = (work, futures)
        todo.sort(key=lambda t: not t[1].offline)  # the slow bounds first: better balance
        try:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(jobs, len(todo))) as pool:
                results = pool.imap_unordered(_run_forked, todo)
                infinite = infinite_ratio(work)  # while the workers run
                for i, result in enumerate(results):
                    done[(result.cache_blocks, policy_name(result.policy))] = result
                    if progress:
                        progress(i + 1, len(todo), f"{result.policy} @ {result.cache_blocks} blocks")
        finally:
            _FORKED = None
    else:
        for i, (c, p) in enumerate(todo):
            if progress:
                progress(i, len(todo), f"{p.value} @ {c} blocks")
            done[(c, p)] = run_policy(work, p, c, future(p))
        if progress:
            progress(len(todo), len(todo), "done")
    results = [done[(c, p)] for c in capacities for p in names]
    belady = {c: done[(c, PolicyName.BELADY)].block_hit_ratio for c in capacities if (c, PolicyName.BELADY) in done}
    mins = {c: done[(c, PolicyName.MIN)].block_hit_ratio for c in capacities if (c, PolicyName.MIN) in done}
    opts = {c: done[(c, PolicyName.OPT)].block_hit_ratio for c in capacities if (c, PolicyName.OPT) in done}
    if infinite is None:
        infinite = infinite_ratio(work)
    return SweepResult(results, infinite, belady, mins, time.perf_counter() - start_s, opts)
