"""`kvtier replay --real`: a trace through the real OffloadManager, real tiers and real bytes.

The trace's requests run one after another (no clock: the point is the bytes, not queueing) through an
`OffloadManager` with a real LMDB disk tier on `--disk-path` (a temporary directory by default), real
gpu and host slot pools (CPU memory on a machine without CUDA) and a `BlockKVBuffer` as the engine's KV.
The KV geometry is the model's, scaled to fit this machine (`scaled_spec`: few layers and heads, so a
block is about 128 KiB); compute is not executed: its time comes from the cost model.

Per request: the next `--prefetch-window` requests are queued (the prefetcher promotes their blocks in
the background), the plan is made, the restored blocks are loaded into the engine buffer and their bytes
checked against the pattern they were saved with (every block is filled with a value derived from its
key), the rest is "computed" (filled with its pattern), then every full block is saved and the request
finishes. Reported: hit ratios per tier, the measured wall time of each load beside the time the cost
model predicted for it (`plan.load_s`), their median relative error, the estimated prefill times, bytes
moved, the manager's and the disk's counters, and `corrupt_blocks` (restored bytes that were wrong: must
be 0).

Cost model: transfers are predicted with this machine's profile (`--transfer-profile`, default
`cpu-this-machine`) for the scaled block; compute (the planner's recompute side and the prefill estimate)
with the model on `--hardware`. Keys are the trace's ids (`trace_key`); only full blocks are cached (an
engine caches only full blocks).

Imports torch (the real tiers need it); the simulation path does not import this module.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.spec import KVSpec, preset_config
from kvtier.tiers.tier import format_size

TARGET_BLOCK_BYTES = 128 * 1024


def scaled_spec(model: str, block_tokens: int, target_bytes: int = TARGET_BLOCK_BYTES) -> KVSpec:
    """The model's KV geometry shrunk so a block is about `target_bytes` (4 layers, 1 KV head, fp16)."""
    config = preset_config(model)
    head_dim = max(8, min(128, target_bytes // (block_tokens * 4 * 2 * 2)))
    head_dim = 1 << (head_dim.bit_length() - 1)
    return KVSpec(model_id=f"{config['_name_or_path']}#replay-scaled", num_layers=4, num_kv_heads=1,
                  head_dim=head_dim, dtype="float16", kv_factor=2, block_tokens=block_tokens,
                  weights_revision="replay-pattern")


def _pattern(key: BlockKey) -> float:
    """The value every element of a block is filled with (exact in fp16: integers below 2048)."""
    return float(int.from_bytes(key[:4], "little") % 2039 + 1)


def run_real(workload: Any, settings: Any, spec: KVSpec, *, trace_name: str, trace_format: str,
             transfer_profile: str = "cpu-this-machine", disk_path: str | None = None,
             progress: Any = None, remote_url: str | None = None) -> dict[str, Any]:
    """Replays a prepared workload through a real `OffloadManager` (module docstring).

    Args:
        workload: from `replay.simulate.prepare`.
        settings: a `SimSettings` whose capacities are in blocks of `spec`.
        spec: the scaled KV geometry (`scaled_spec`).
        transfer_profile: hardware profile that predicts this machine's transfers.
        disk_path: the disk store's directory; a temporary one (removed after) when None.
        remote_url: a live Redis / Redis Cluster for the remote tier (`settings.remote_blocks` is then the
            size the books assume; None: no remote tier).
        progress: a progress callback or None.

    Returns:
        The report (JSON-ready); `corrupt_blocks` must be 0.
    """
    from kvtier.scheduler.config import OffloadConfig
    from kvtier.scheduler.cost.model import CostModel
    from kvtier.scheduler.manager import OffloadManager
    from kvtier.tiers.kvbuffer import BlockKVBuffer

    from kvtier.scheduler.replay.simulate import capacities
    from kvtier.scheduler.replay.simreport import dist_ms

    bt = workload.block_tokens
    caps = capacities(workload, settings)
    compute = CostModel.from_profile(settings.hardware, settings.model, spec=spec)
    transfers = CostModel.from_profile(transfer_profile, settings.model, spec=spec)
    cost_model = replace(transfers, recompute=compute.recompute)  # this machine's links, the model's compute
    own_dir = None
    if caps["disk"] and not disk_path:
        own_dir = tempfile.TemporaryDirectory(prefix="kvtier-replay-")
        disk_path = own_dir.name
    bpb = spec.bytes_per_block
    if caps.get("remote") and not remote_url:
        raise ConfigError("--remote with --real needs --remote-url URL (a live Redis or Redis Cluster)")
    remote = {"remote_url": remote_url, "remote_bytes": (caps.get("remote") or 1 << 20) * bpb} if remote_url else {}
    config = OffloadConfig(gpu_bytes=caps["gpu"] * bpb, host_bytes=caps["host"] * bpb, **remote,
                           disk_bytes=caps["disk"] * bpb, disk_path=disk_path if caps["disk"] else None,
                           policy=settings.policy, write_mode=settings.write_mode, prefetch=settings.prefetch,
                           prefetch_window=settings.prefetch_window,
                           **({} if settings.prefetch_budget_bytes is None
                              else {"prefetch_budget_bytes": settings.prefetch_budget_bytes}))
    start = time.perf_counter()
    try:
        with OffloadManager(spec, config, cost_model=cost_model) as manager:
            result = _replay(manager, workload.requests, bt, spec, settings.prefetch_window, progress,
                             BlockKVBuffer)
            manager.flush()
            stats = manager.stats()
    finally:
        if own_dir is not None:
            own_dir.cleanup()
    seconds = time.perf_counter() - start
    measured, predicted = np.array(result.pop("measured_load_s")), np.array(result.pop("predicted_load_s"))
    est, planned = np.array(result.pop("prefill_s")), np.array(result.pop("planned_prefill_s"))
    rel = np.abs(predicted - measured) / measured if measured.size else np.array([])
    return {
        "mode": "real", "trace": trace_name, "format": trace_format, "requests": len(workload.requests),
        "model": settings.model, "hardware": settings.hardware, "transfer_profile": transfer_profile,
        "spec": spec.fields(), "bytes_per_block": bpb, "block_tokens": bt,
        "disk_path": None if own_dir is not None else disk_path,
        "capacities": {t: {"blocks": n, "bytes": n * bpb} for t, n in caps.items()},
        **result,
        "loads": int(measured.size),
        "load_ms": {"measured": dist_ms(measured), "predicted": dist_ms(predicted)},
        "load_median_abs_rel_error": round(float(np.median(rel)), 4) if rel.size else None,
        "load_total_s": {"measured": round(float(measured.sum()), 6), "predicted": round(float(predicted.sum()), 6)},
        "ttft_ms": dist_ms(est), "planned_prefill_ms": dist_ms(planned),
        "manager": stats, "seconds": round(seconds, 3),
    }


def _replay(manager: Any, requests: Sequence[Any], bt: int, spec: KVSpec, window: int, progress: Any,
            buffer_cls: Any) -> dict[str, Any]:
    """Runs the requests through the manager; returns the measured figures."""
    decider = manager.decider
    max_blocks = max(1, max(r.num_tokens // bt for r in requests))
    buffer = buffer_cls(spec, max_blocks)
    data = buffer.data
    full = [tuple(r.keys[:r.num_tokens // bt]) for r in requests]
    hits = {"gpu": 0, "host": 0, "disk": 0, "remote": 0}
    out: dict[str, Any] = {"measured_load_s": [], "predicted_load_s": [], "prefill_s": [], "planned_prefill_s": []}
    total_blocks = hit_blocks = corrupt = restored = 0
    enqueued = 0
    for i, request in enumerate(requests):
        while enqueued < len(requests) and enqueued <= i + window:
            # keys come from the trace: the decider is driven directly (see the module docstring)
            manager.enqueue_keys(str(enqueued), full[enqueued], requests[enqueued].num_tokens)
            enqueued += 1
        keys, rid = full[i], str(i)
        total_blocks += len(keys)
        entries = decider.lookup(keys)
        hit_blocks += len(entries)
        for entry in entries:
            hits[entry.best_tier.value] += 1
        plan = manager.plan(rid)
        t0 = time.perf_counter()
        loading = manager.load(rid, buffer, plan, dst_blocks=range(len(keys)))
        n_ok = loading.wait()
        took = time.perf_counter() - t0
        a, b = loading.restore_start, loading.restore_start + n_ok
        if loading.num_restored_blocks:
            out["measured_load_s"].append(took)
            out["predicted_load_s"].append(plan.load_s)
            restored += b - a
            for j in range(a, b):  # the restored bytes must be what was saved
                if float(data[j].view(-1)[0]) != _pattern(keys[j]) or float(data[j].view(-1)[-1]) != _pattern(keys[j]):
                    corrupt += 1
        restored_s = took if loading.num_restored_blocks else 0.0
        out["prefill_s"].append(max(plan.front_compute_s, restored_s) + plan.suffix_compute_s)
        out["planned_prefill_s"].append(plan.total_s)
        for j in [*range(0, a), *range(b, len(keys))]:  # the engine "computes" the rest
            data[j].fill_(_pattern(keys[j]))
        # the buffer is reused by the next request: its save must have copied out first
        manager.store_keys(rid, keys, buffer).wait(60.0)
        manager.finish(rid)
        if progress is not None and (i % 20 == 0 or i + 1 == len(requests)):
            progress(i + 1, len(requests), "requests")
    return {"blocks": total_blocks, "block_hit_ratio": round(hit_blocks / total_blocks, 6) if total_blocks else 0.0,
            "hit_ratio_by_tier": {t: round(n / total_blocks, 6) if total_blocks else 0.0 for t, n in hits.items()},
            "restored_blocks": restored, "corrupt_blocks": corrupt, **out}


def real_table(doc: dict[str, Any]) -> str:
    """A readable summary of a --real run."""
    load = doc["load_ms"]
    caps = ", ".join(f"{t} {v['blocks']:,} blocks ({format_size(v['bytes'])})" for t, v in doc["capacities"].items())
    err = doc["load_median_abs_rel_error"]
    lines = [
        f"kvtier replay --real of {doc['trace']}: {doc['requests']:,} requests through the real tiers "
        f"(block {format_size(doc['bytes_per_block'])}, {doc['block_tokens']} tokens; {caps})",
        f"block hit ratio {doc['block_hit_ratio']:.4f} (" + ", ".join(
            f"{t} {v:.4f}" for t, v in doc["hit_ratio_by_tier"].items()) + ")",
        f"loads: {doc['loads']:,}, {doc['restored_blocks']:,} blocks restored, {doc['corrupt_blocks']} corrupt",
        f"load ms measured  p50 {load['measured']['p50']:.3f} p90 {load['measured']['p90']:.3f} "
        f"p99 {load['measured']['p99']:.3f} mean {load['measured']['mean']:.3f}",
        f"load ms predicted p50 {load['predicted']['p50']:.3f} p90 {load['predicted']['p90']:.3f} "
        f"p99 {load['predicted']['p99']:.3f} mean {load['predicted']['mean']:.3f} "
        f"({doc['transfer_profile']}; median |error| {'-' if err is None else f'{100 * err:.0f}%'})",
        f"prefill estimate ms (compute on {doc['hardware']} + measured load): p50 {doc['ttft_ms']['p50'] or 0:.1f} "
        f"p99 {doc['ttft_ms']['p99'] or 0:.1f}",
        f"prefetch coverage {doc['manager'].get('prefetch_coverage')}, {doc['manager'].get('prefetched_blocks')} "
        f"blocks promoted; wall {doc['seconds']:.1f} s",
    ]
    if load["measured"]["p50"] is None:
        lines[3:5] = ["no block was restored (nothing cached was reused)"]
    return "\n".join(lines)
