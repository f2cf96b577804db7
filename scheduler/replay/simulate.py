"""`kvtier replay` simulation mode: a trace through kvtier's real scheduler on a simulated engine.

Primitives:
- `SimSettings`: everything a simulation run is configured by (model, hardware, capacities in blocks,
  policy, prefetch, batch limit, time scale, block size); `None` fields take the defaults below.
- `prepare(requests, block_tokens)` -> `Workload`: the trace's requests as `SimRequest`s (keys from
  `kvtier.tiers.keys.trace_key`, a trace block of B tokens split into B / block_tokens kvtier blocks),
  the unique block count and the no-cache load.
- `simulate(workload, settings)` -> `Simulation`: one run; `run_all(...)` the run plus the same run's
  baselines (no cache, GPU-only prefix cache, offload without prefetch) and bounds (infinite cache and
  Belady, from `kvtier.scheduler.replay.hitonly`).

Defaults (printed in every report): llama-3-8b on h100-sxm; tiers that hold about 5% / 30% / 100% of the
trace's unique blocks in gpu / host / disk; the `auto` policy; prefetch on; write-through; 16 running requests at most;
`--time-scale auto`, which multiplies arrival times so that the no-cache load is 0.7, where
no-cache load = sum over requests of (prefill of the whole prompt + (output - 1) decode steps at a full
batch, each step's time divided by the batch) / the trace's duration, for one instance.

The decision half is the real one (`kvtier.scheduler.decider.Decider` with `Planner` and `CostModel`);
`simcore` documents the engine model. Nothing here imports torch.

Speed: a run (and the bounds) runs with Python's cyclic garbage collector paused (`gc_paused`). It
builds hundreds of thousands of long-lived objects (index entries, commands, records) and frees them by
reference counting; the collector's full passes over them found nothing to free and cost about a fifth
of a run's time (the shared trace: the same peak memory with or without them). What cycles a run leaves
are collected once it returns; the decider's books, which refer to each other, are first dropped by
`Decider.close` (the shared trace: that first pass walked 0.7 M objects in ~0.6 s; now 50 k in 0.05 s).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Sequence

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.keys import BlockKey, chain_keys, namespace, trace_key

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.decider import Decider
from kvtier.scheduler.planner import Planner
from kvtier.scheduler.replay.simcore import EngineSim, Progress, RequestRecord, SimCounters, SimRequest
from kvtier.scheduler.replay.traces import Request, block_weights

log = logging.getLogger(__name__)

#: fractions of the unique blocks each tier holds by default
DEFAULT_FRACTIONS = {"gpu": 0.05, "host": 0.30, "disk": 1.00}
DEFAULT_TARGET_LOAD = 0.7


@dataclass(frozen=True, slots=True)
class SimSettings:
    """One simulation run's configuration (module docstring for the defaults).

    Attributes:
        model: model preset name.
        hardware: hardware profile name or JSON path.
        gpu_blocks, host_blocks, disk_blocks: tier capacities in blocks (None: the default fraction of the
            unique blocks; 0: no such tier).
        remote_blocks: the remote tier's capacity in blocks (`--remote`; 0: none): the shared server's
            maxmemory with its LRU, modelled by the decision half's books of it.
        policy: eviction policy of every tier (`kvtier.scheduler.policies`).
        prefetch: whether queued requests' blocks are promoted.
        prefetch_window: queued requests the prefetcher looks over.
        prefetch_budget_bytes: promotions in flight at most (None: the OffloadConfig default).
        write_mode: "write-through" or "write-back".
        max_batch: requests running at once.
        time_scale: arrival-time multiplier (None: auto, the no-cache load becomes `target_load`).
        target_load: the no-cache load `time_scale` auto aims at.
        block_tokens: kvtier block size (None: the trace's).
        cache: False for the no-cache baseline.
    """

    model: str = "llama-3-8b"
    hardware: str = "h100-sxm"
    gpu_blocks: int | None = None
    host_blocks: int | None = None
    disk_blocks: int | None = None
    remote_blocks: int = 0
    policy: str = "auto"
    prefetch: bool = True
    prefetch_window: int = 16
    prefetch_budget_bytes: int | None = None
    write_mode: str = "write-through"
    max_batch: int = 16
    time_scale: float | None = None
    target_load: float = DEFAULT_TARGET_LOAD
    block_tokens: int | None = None
    cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"--max-batch: {self.max_batch!r}; expected an int >= 1")
        if self.time_scale is not None and not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ConfigError(f"--time-scale: {self.time_scale!r}; expected a number > 0 or 'auto'")
        if not 0 < self.target_load < 10:
            raise ConfigError(f"target load: {self.target_load!r}; expected 0 < load < 10")
        for name in ("gpu_blocks", "host_blocks", "disk_blocks", "remote_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name}: {value!r}; expected an int >= 0 (blocks)")
        if self.block_tokens is not None and (not isinstance(self.block_tokens, int) or self.block_tokens < 1):
            raise ConfigError(f"--block-tokens: {self.block_tokens!r}; expected an int >= 1")


@dataclass(slots=True)
class Workload:
    """A trace prepared for simulation (arrival times not yet scaled).

    Attributes:
        requests: one `SimRequest` per trace request, arrival at trace time (scale 1).
        block_tokens: kvtier block size of the keys.
        unique_blocks: distinct keys.
        cost_model: the model on the hardware at `block_tokens`.
        no_cache_work_s: sum of every request's no-cache service time (module docstring).
        duration_s: the trace's span (last arrival - first).
    """

    requests: list[SimRequest]
    block_tokens: int
    unique_blocks: int
    cost_model: CostModel
    no_cache_work_s: float
    duration_s: float

    @property
    def no_cache_load(self) -> float:
        """No-cache load at time scale 1 (inf for a trace whose requests all arrive at once)."""
        return self.no_cache_work_s / self.duration_s if self.duration_s > 0 else math.inf

    def auto_time_scale(self, target_load: float) -> float:
        """The arrival-time multiplier that makes the no-cache load `target_load` (1 if undefined)."""
        return self.no_cache_load / target_load if 0 < self.duration_s and self.no_cache_work_s > 0 else 1.0


def _split_keys(request: Request, block_tokens: int, cache: dict) -> tuple[tuple[BlockKey, ...], tuple[int, ...]]:
    """Keys and tokens of a request's kvtier blocks (trace ids split into block_tokens pieces)."""
    if request.block_ids is None:  # token ids: kvtier's own chained keys of the full blocks
        tokens = request.token_ids or ()
        keys = tuple(chain_keys(list(tokens), block_tokens, namespace(bytes(16), b"trace")))
        return keys, (block_tokens,) * len(keys)
    weights = block_weights(request.input_tokens, len(request.block_ids), request.block_tokens)
    if block_tokens == request.block_tokens:
        keys = []
        for h in request.block_ids:
            key = cache.get(h)
            if key is None:
                key = cache[h] = trace_key(h)
            keys.append(key)
        return tuple(keys), tuple(weights)
    if request.block_tokens % block_tokens:
        raise ConfigError(f"--block-tokens: {block_tokens} does not divide the trace's block of "
                          f"{request.block_tokens} tokens (line {request.line}); expected a divisor")
    factor = request.block_tokens // block_tokens
    keys, sub_weights = [], []
    for h, w in zip(request.block_ids, weights):
        for j in range(-(-w // block_tokens)):
            keys.append(trace_key(h * factor + j))  # (id, piece) -> a distinct key
            sub_weights.append(min(block_tokens, w - j * block_tokens))
    return tuple(keys), tuple(sub_weights)


def prepare(requests: Sequence[Request], settings: SimSettings) -> Workload:
    """Builds the simulated requests, the cost model and the no-cache load of a trace.

    Raises:
        ConfigError: no request, an unknown model or hardware profile, a block size that does not divide
            the trace's.
    """
    if not requests:
        raise ConfigError("trace: no request to simulate")
    block_tokens = settings.block_tokens or requests[0].block_tokens
    cost_model = CostModel.from_profile(settings.hardware, settings.model, block_tokens=block_tokens)
    cache: dict = {}
    unique: set = set()
    out: list[SimRequest] = []
    work_s = 0.0
    batch = settings.max_batch
    decode_cache: dict[int, float] = {}
    t0 = requests[0].arrival_s
    for r in requests:
        keys, weights = _split_keys(r, block_tokens, cache)
        unique.update(keys)
        out.append(SimRequest(r.arrival_s - t0, keys, weights, r.input_tokens, r.output_tokens))
        work_s += cost_model.recompute_s(0, r.input_tokens)
        if r.output_tokens > 1:
            bucket = (r.input_tokens + r.output_tokens // 2) >> 8
            step = decode_cache.get(bucket)
            if step is None:
                step = decode_cache[bucket] = cost_model.decode_step_s(batch, (bucket << 8) + 128) / batch
            work_s += (r.output_tokens - 1) * step
    return Workload(out, block_tokens, len(unique), cost_model, work_s, out[-1].arrival_s - out[0].arrival_s)


def capacities(workload: Workload, settings: SimSettings) -> dict[str, int]:
    """Tier capacities in blocks: the settings', or the default fractions of the unique blocks."""
    out = {}
    for tier, fraction in DEFAULT_FRACTIONS.items():
        given = getattr(settings, f"{tier}_blocks")
        out[tier] = given if given is not None else max(1, round(workload.unique_blocks * fraction))
    if settings.remote_blocks:
        out["remote"] = settings.remote_blocks
    if out["gpu"] == 0 and out["host"] == 0:
        raise ConfigError("--gpu/--host: at least one memory tier must hold a block (both are 0)")
    return out


@dataclass(slots=True)
class Simulation:
    """One finished run."""

    settings: SimSettings
    capacities: dict[str, int]
    time_scale: float
    records: list[RequestRecord]
    counters: SimCounters
    decider_stats: dict[str, Any] | None
    wall_s: float


def make_decider(workload: Workload, settings: SimSettings, caps: dict[str, int]) -> Decider:
    """The real decision half for these capacities (keys are trace ids, no bytes anywhere)."""
    bpb = workload.cost_model.spec.bytes_per_block
    extra = {} if settings.prefetch_budget_bytes is None else {"prefetch_budget_bytes": settings.prefetch_budget_bytes}
    config = OffloadConfig(gpu_bytes=caps["gpu"] * bpb, host_bytes=caps["host"] * bpb, disk_bytes=caps["disk"] * bpb,
                           disk_path="(simulated)" if caps["disk"] else None, policy=settings.policy,
                           write_mode=settings.write_mode, prefetch=settings.prefetch,
                           prefetch_window=settings.prefetch_window,
                           # a remote in simulation: the decision half's books stand for the server (one instance)
                           remote_url="redis://simulated" if caps.get("remote") else None,
                           remote_bytes=caps.get("remote", 0) * bpb, **extra)
    return Decider(workload.cost_model.spec, config, Planner(workload.cost_model))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector for the block (module docstring, Speed); the cycles the block
    leaves are collected by the next automatic pass after it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def simulate(workload: Workload, settings: SimSettings, progress: Progress | None = None) -> Simulation:
    """Runs the workload once under `settings` (module docstring)."""
    with gc_paused():
        return _simulate(workload, settings, progress)


def _simulate(workload: Workload, settings: SimSettings, progress: Progress | None) -> Simulation:
    start = time.perf_counter()
    scale = settings.time_scale or workload.auto_time_scale(settings.target_load)
    requests = workload.requests if scale == 1.0 else [replace(r, arrival_s=r.arrival_s * scale)
                                                       for r in workload.requests]
    caps = capacities(workload, settings)
    decider = make_decider(workload, settings, caps) if settings.cache else None
    engine = EngineSim(requests, workload.cost_model, decider, settings.max_batch, progress)
    records = engine.run()
    stats = None
    if decider is not None:
        stats = asdict(decider.stats)
        decider.close()
    return Simulation(settings, caps, scale, records, engine.counters, stats, time.perf_counter() - start)


def baseline_settings(settings: SimSettings, caps: dict[str, int]) -> dict[str, SimSettings]:
    """The same run's baselines: no cache, a GPU-only prefix cache, offload without prefetch."""
    out = {"no_cache": replace(settings, cache=False)}
    if caps["gpu"]:
        out["gpu_only"] = replace(settings, gpu_blocks=caps["gpu"], host_blocks=0, disk_blocks=0, remote_blocks=0,
                                  prefetch=False)
    if settings.prefetch and (caps["host"] or caps["disk"]):
        out["offload_no_prefetch"] = replace(settings, gpu_blocks=caps["gpu"], host_blocks=caps["host"],
                                             disk_blocks=caps["disk"], prefetch=False)
    return out


def bounds(workload: Workload, caps: dict[str, int]) -> dict[str, Any]:
    """Infinite-cache and `opt` hit ratios (the bounds) and the Belady reference (the hit-only code's), at
    the hierarchy's and the gpu's size."""
    with gc_paused():
        return _bounds(workload, caps)


def _bounds(workload: Workload, caps: dict[str, int]) -> dict[str, Any]:
    from kvtier.scheduler.replay.hitonly import HitOnlyWorkload, infinite_ratio, run_policy

    keys = [r.keys for r in workload.requests]
    total = float(sum(len(k) for k in keys))
    work = HitOnlyWorkload(keys, None, 0, total)
    infinite = infinite_ratio(work)
    total_blocks = caps["gpu"] + caps["host"] + caps["disk"] + caps.get("remote", 0)
    out: dict[str, Any] = {"infinite": infinite, "belady_cache_blocks": total_blocks}

    def ratio(policy: str, capacity: int) -> float:
        if capacity >= workload.unique_blocks:
            return infinite  # nothing is ever evicted
        return run_policy(work, policy, capacity).block_hit_ratio

    out["opt"] = ratio("opt", total_blocks)
    out["belady"] = ratio("belady", total_blocks)
    if caps["gpu"]:
        out["opt_gpu"] = ratio("opt", caps["gpu"])
        out["belady_gpu"] = ratio("belady", caps["gpu"])
        out["belady_gpu_cache_blocks"] = caps["gpu"]
    return out


_FORKED: dict[str, Any] = {}


def _run_baseline(name: str) -> Any:
    """Runs one baseline (or "bounds") on the workload stashed before a fork; returns its summary."""
    from kvtier.scheduler.replay.simreport import summarize

    workload, settings, caps = _FORKED["workload"], _FORKED["settings"], _FORKED["caps"]
    if name == "bounds":
        return bounds(workload, caps)
    return summarize(simulate(workload, baseline_settings(settings, caps)[name]), workload)


#: the baselines' work, heaviest first (the order the worker takes them in)
_HEAVIEST_FIRST = ("offload_no_prefetch", "gpu_only", "bounds", "no_cache")


def run_all(workload: Workload, settings: SimSettings, *, with_baselines: bool = True, jobs: int = 1,
            progress: Progress | None = None) -> tuple[Simulation, dict[str, Any], dict[str, Any] | None]:
    """The run, its baselines' summaries and the bounds.

    With jobs > 1 the baselines run in `jobs - 1` forked workers, heaviest first, while this process
    runs the main run; then this process takes back the baselines no worker has started (lightest
    first), so that the work ends about together on a busy machine as on an idle one.

    Returns:
        (the run, {baseline name: summary}, bounds or None without baselines).
    """
    caps = capacities(workload, settings)
    if not with_baselines:
        return simulate(workload, settings, progress), {}, None
    order = list(baseline_settings(settings, caps))
    names = sorted([*order, "bounds"], key=_HEAVIEST_FIRST.index)
    _FORKED.update(workload=workload, settings=settings, caps=caps)
    pool = None
    if jobs > 1 and "fork" in _start_methods():
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=jobs - 1, mp_context=multiprocessing.get_context("fork"))
    try:
        futures = {name: pool.submit(_run_baseline, name) for name in names} if pool is not None else {}
        main = simulate(workload, settings, progress)
        others = {}
        for name in reversed(names):
            future = futures.get(name)
            if future is None or future.cancel():
                others[name] = _run_baseline(name)
        for name, future in futures.items():
            if name not in others:
                others[name] = future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        _FORKED.clear()
    found = others.pop("bounds")
    return main, {name: others[name] for name in order}, found


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()
