"""Reports of the simulation mode: figures of a run, its JSON document, the summary table, the plot.

Primitives:
- `summarize(simulation, workload)`: every figure of one run as a JSON-ready dict: `block_hit_ratio`
  and `token_hit_ratio` (a hit in any tier, leading blocks at prefill start), `hit_ratio_by_tier`
  {`blocks`, `tokens`} {gpu, host, disk}, `ttft_ms`, `queue_ms`, `prefill_ms` ({p50, p90, p99, mean}),
  `prefill_over_plan_ms` (contention: measured prefill - planned), `bytes_moved` per link and per
  reason, `link_busy_s`, `prefetch` {coverage, prefetched_blocks, ...}, `decisions` (plans that restored
  every matched block, recomputed them, split them, had nothing cached, or fell back to recompute because
  a block vanished), `commands`, `decider` (the Decider's own counters), `makespan_s`, `gpu_utilization`.
- `simulation_json(...)`: the run's summary at the top level plus `mode`, `settings` (defaults filled in),
  `capacities`, `time_scale`, `no_cache_load`, `load`, `baselines` {name: summary}, `bounds`
  {infinite, opt (the bounds), belady (a reference), ...}, `seconds`.
- `simulation_table(doc)`, `progress_bar()`, `check_plotting()`, `plot(simulation, doc, path)`.

No torch; matplotlib only inside `plot` (the `plot` extra), with a clear error when it is missing.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import format_size

RATIO_DIGITS = 6


def dist_ms(values_s: np.ndarray) -> dict[str, float | None]:
    """p50 / p90 / p99 / mean in ms (None for no value: JSON has no NaN)."""
    values_s = np.asarray(values_s, dtype=float)
    if values_s.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(values_s, [50, 90, 99]) * 1e3
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "mean": round(float(values_s.mean()) * 1e3, 3)}


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, RATIO_DIGITS) if den else None


def summarize(sim: Any, workload: Any) -> dict[str, Any]:
    """Every figure of one `Simulation` (module docstring)."""
    records, c = sim.records, sim.counters
    arrival = np.fromiter((r.arrival_s for r in records), float, len(records))
    start = np.fromiter((r.start_s for r in records), float, len(records))
    first = np.fromiter((r.first_token_s for r in records), float, len(records))
    planned = np.fromiter((r.planned_s for r in records), float, len(records))
    finish = np.fromiter((r.finish_s for r in records), float, len(records))
    prefill = first - start
    hit_blocks = sum(c.hit_blocks_by_tier.values())
    hit_tokens = sum(c.hit_tokens_by_tier.values())
    stats = sim.decider_stats or {}
    restored = stats.get("restored_blocks", 0)
    out: dict[str, Any] = {
        "requests": len(records),
        "block_hit_ratio": _ratio(hit_blocks, c.blocks) or 0.0,
        "token_hit_ratio": _ratio(hit_tokens, c.tokens) or 0.0,
        "hit_ratio_by_tier": {
            "blocks": {t: _ratio(n, c.blocks) for t, n in c.hit_blocks_by_tier.items()},
            "tokens": {t: _ratio(n, c.tokens) for t, n in c.hit_tokens_by_tier.items()}},
        "ttft_ms": dist_ms(first - arrival),
        "queue_ms": dist_ms(start - arrival),
        "prefill_ms": dist_ms(prefill),
        "prefill_over_plan_ms": dist_ms(prefill - planned),
        "bytes_moved": dict(c.bytes_by_link),
        "bytes_moved_by_reason": dict(sorted(c.bytes_by_reason.items())),
        "link_busy_s": {k: round(v, 6) for k, v in c.busy_s_by_link.items()},
        "decisions": dict(c.decisions),
        "commands": dict(c.commands),
        "prefetch": {
            "enabled": sim.settings.prefetch and sim.settings.cache,
            "coverage": _ratio(stats.get("prefetch_ready_blocks", 0), restored),
            "restored_blocks": restored,
            "prefetched_blocks": stats.get("prefetched_blocks", 0)},
        "makespan_s": round(float(finish.max() - arrival.min()), 6) if len(records) else 0.0,
        "gpu_utilization": _ratio(c.gpu_busy_s, float(finish.max() - arrival.min())) if len(records) else None,
        "decode_steps": c.decode_steps,
        "decider": stats,
        "wall_s": round(sim.wall_s, 4),
    }
    return out


def simulation_json(sim: Any, workload: Any, baselines: dict[str, Any], bounds: dict[str, Any] | None,
                    meta: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The JSON document of a simulation run (module docstring)."""
    summary = summarize(sim, workload)
    spec = workload.cost_model.spec
    bpb = spec.bytes_per_block
    settings = asdict(sim.settings)
    settings.update(time_scale=sim.time_scale, block_tokens=workload.block_tokens)
    doc: dict[str, Any] = {
        "mode": "simulation", **meta,
        "requests": len(workload.requests), "blocks": sum(len(r.keys) for r in workload.requests),
        "unique_blocks": workload.unique_blocks,
        "model": sim.settings.model, "hardware": sim.settings.hardware, "block_tokens": workload.block_tokens,
        "bytes_per_block": bpb, "settings": settings,
        "capacities": {t: {"blocks": n, "bytes": n * bpb, "fraction_of_unique": _ratio(n, workload.unique_blocks)}
                       for t, n in sim.capacities.items()},
        "time_scale": round(sim.time_scale, 6), "time_scale_auto": sim.settings.time_scale is None,
        "no_cache_load": round(workload.no_cache_load, 6) if math.isfinite(workload.no_cache_load) else None,
        "load": round(workload.no_cache_load / sim.time_scale, 6) if math.isfinite(workload.no_cache_load) else None,
        **summary,
        "baselines": baselines,
        "bounds": {k: (round(v, RATIO_DIGITS) if isinstance(v, float) else v) for k, v in (bounds or {}).items()},
        "seconds": round(seconds, 4),
    }
    return doc


def _ms(d: dict[str, float | None]) -> str:
    return " ".join("        -" if d[k] is None else f"{d[k]:9.1f}" for k in ("p50", "p90", "p99", "mean"))


def simulation_table(doc: dict[str, Any]) -> str:
    """A readable summary of `simulation_json`'s document."""
    s = doc["settings"]
    caps = doc["capacities"]
    lines = [
        f"kvtier replay (simulation) of {doc['trace']}: {doc['requests']:,} requests, {doc['blocks']:,} blocks "
        f"({doc['unique_blocks']:,} unique) of {doc['block_tokens']} tokens",
        f"  model {doc['model']} on {doc['hardware']}; block = {format_size(doc['bytes_per_block'])}; "
        f"policy {s['policy']}, prefetch {'on' if s['prefetch'] else 'off'}, {s['write_mode']}, "
        f"max batch {s['max_batch']}",
        "  tiers: " + ", ".join(f"{t} {v['blocks']:,} blocks ({format_size(v['bytes'])}, "
                                f"{100 * (v['fraction_of_unique'] or 0):.0f}% of unique)" for t, v in caps.items()),
        f"  time scale {doc['time_scale']:.3f}{' (auto)' if doc['time_scale_auto'] else ''}: no-cache load "
        f"{doc['load'] if doc['load'] is None else round(doc['load'], 3)} "
        f"(at scale 1: {doc['no_cache_load'] if doc['no_cache_load'] is None else round(doc['no_cache_load'], 3)})",
        "",
        f"{'run':<22} {'hit(blk)':>8} {'hit(tok)':>8}   TTFT ms: {'p50':>9} {'p90':>9} {'p99':>9} {'mean':>9}",
    ]
    rows = [("kvtier", doc)] + [(name.replace("_", " "), b) for name, b in doc.get("baselines", {}).items()]
    for name, r in rows:
        lines.append(f"{name:<22} {r['block_hit_ratio']:8.4f} {r['token_hit_ratio']:8.4f}            "
                     f"{_ms(r['ttft_ms'])}")
    b = doc.get("bounds") or {}
    if b:
        bound = f"bounds: infinite cache {b['infinite']:.4f}"
        if "opt" in b:
            bound += f", opt at {b['belady_cache_blocks']:,} blocks {b['opt']:.4f}"
        if "opt_gpu" in b:
            bound += f", opt at the gpu's {b['belady_gpu_cache_blocks']:,} blocks {b['opt_gpu']:.4f}"
        bound += f" (reference: Belady {b['belady']:.4f})"
        lines.append(bound)
    tiers = doc["hit_ratio_by_tier"]
    lines += [
        "",
        "hits by tier (blocks / tokens): " + ", ".join(
            f"{t} {tiers['blocks'][t] or 0:.4f} / {tiers['tokens'][t] or 0:.4f}" for t in tiers["blocks"]),
        f"queueing ms (p50 p90 p99 mean): {_ms(doc['queue_ms'])}",
        f"prefill ms  (p50 p90 p99 mean): {_ms(doc['prefill_ms'])}; over plan (link contention) p99 "
        f"{doc['prefill_over_plan_ms']['p99'] or 0:.2f} ms",
        "plans: " + ", ".join(f"{k} {v:,}" for k, v in doc["decisions"].items()),
        f"prefetch coverage: {doc['prefetch']['coverage'] if doc['prefetch']['coverage'] is not None else '-'} "
        f"({doc['prefetch']['prefetched_blocks']:,} blocks promoted, {doc['prefetch']['restored_blocks']:,} restored)",
        "bytes moved: " + ", ".join(f"{k} {format_size(v)}" for k, v in doc["bytes_moved"].items()),
        f"GPU utilization {doc['gpu_utilization']}, makespan {doc['makespan_s']:.1f} s simulated; "
        f"wall {doc['seconds']:.2f} s",
    ]
    return "\n".join(lines)


def progress_bar() -> Callable[[int, int, str], None]:
    """A one-line progress bar on stderr."""
    start = time.perf_counter()

    def show(done: int, total: int, label: str) -> None:
        width = 30
        filled = int(width * done / max(1, total))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} {label} "
                         f"{time.perf_counter() - start:5.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def check_plotting() -> None:
    """Raises ConfigError naming the extra when matplotlib is missing (before a long run, not after)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot: matplotlib is not installed; install the plot extra "
                          "(pip install 'kvtier[plot]') or leave out --plot") from None


def plot(sim: Any, doc: dict[str, Any], path: str) -> None:
    """Writes a PNG: the TTFT distribution (CDF, with the baselines' percentiles) and hits per tier."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft = np.sort(np.fromiter((r.ttft_s * 1e3 for r in sim.records), float, len(sim.records)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label="kvtier")
    for name, b in doc.get("baselines", {}).items():
        t = b["ttft_ms"]
        ax1.plot([t["p50"], t["p90"], t["p99"]], [0.5, 0.9, 0.99], "o--", label=f"{name} (p50/p90/p99)")
    ax1.set_xscale("log")
    ax1.set_xlabel("TTFT (ms)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT distribution")
    ax1.legend(fontsize=8)
    runs = [("kvtier", doc)] + list(doc.get("baselines", {}).items())
    bottom = np.zeros(len(runs))
    for tier in ("gpu", "host", "disk", "remote"):
        values = np.array([r["hit_ratio_by_tier"]["blocks"].get(tier) or 0.0 for _, r in runs])
        ax2.bar([n for n, _ in runs], values, bottom=bottom, label=tier)
        bottom += values
    if doc.get("bounds"):
        ax2.axhline(doc["bounds"]["infinite"], color="k", ls=":", label="infinite cache")
    ax2.set_ylabel("block hit ratio")
    ax2.set_title("hits by tier")
    ax2.legend(fontsize=8)
    ax2.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"{doc['trace']}: {doc['model']} on {doc['hardware']}, policy {doc['settings']['policy']}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise ConfigError(f"--plot: cannot write {path} ({err.strerror})") from err
    finally:
        plt.close(fig)
