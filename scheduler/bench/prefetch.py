"""`kvtier bench prefetch`: does prefetching queued requests' KV pay? (simulated clock: deterministic)

The replay simulator (the real Decider, prefetch admission and planner on a simulated engine and links;
llama-3-8b on h100-sxm, 16 requests at most per batch, 64-token blocks) runs the built-in `docqa` and
`chat` workloads (1,500 requests each, seed 0) with small memory tiers (gpu 2%, host 5% of the unique
blocks) and a disk that holds every block, at no-cache loads 0.5, 0.7 and 0.9. At each point three runs
with the same arrivals: prefetch off, prefetch on, and a reference whose host holds every block (prefetch
off): the distance prefetch could close at most.

Figures (JSON keys):
- `worst_p50_ratio`, `worst_p99_ratio`: TTFT with / without prefetch, worst over workloads and loads
  (target <= 1.02: prefetch never at a running request's expense);
- `p99_gain_at_0_9` (1 - on/off of TTFT p99 at load 0.9, the worse workload; target >= 0.05) and
  `chat_mean_gain_at_0_9` (mean TTFT; target >= 0.20);
- `double_reads`: blocks a load read from disk while a promotion of them was in flight, every run
  (the simulator's links count them; target 0);
- `promoted_used_fraction`: promoted blocks a load read before they left host, over all runs (>= 0.8);
- `disk_busy_ratio`: the disk's busy time (reads and writes: one device) with / without prefetch, worst
  run (<= 1.1); `disk_read_busy_ratio`: the same for reads alone (prefetch makes prefills restore
  blocks they recomputed before: see docs/prefetch.md);
- `demo_p50_ratio`: `make demo`'s run (`kvtier replay`: chat, 2,000 requests, default tiers, load
  0.7) on / off (target 0.99 - 1.01);
- `gap_closed_p90` / `gap_closed_p99`: (off - on) / (off - all-host) of TTFT p90 / p99 at load 0.9, the
  worse workload (`gap_closed` per workload and load in `runs`);
- `runs`: every run's figures.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

KINDS = ("docqa", "chat")
LOADS = (0.5, 0.7, 0.9)
REQUESTS = 1500
QUICK_REQUESTS = 300
GPU_FRACTION, HOST_FRACTION = 0.02, 0.05
#: `make demo`'s workload (`kvtier replay` with no trace: `cli.simulate.DEMO_WORKLOAD`, `DEMO_REQUESTS`)
DEMO = ("chat", 2000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests of each workload (default {REQUESTS}; --quick {QUICK_REQUESTS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in workloads (default 0)")


def _figures(sim: Any, workload: Any) -> dict[str, Any]:
    from kvtier.scheduler.replay.simreport import summarize

    doc = summarize(sim, workload)
    st = doc["decider"] or {}
    busy = sim.counters.busy_s_by_link
    return {"ttft_ms": doc["ttft_ms"], "block_hit_ratio": doc["block_hit_ratio"],
            "hit_ratio_by_tier": doc["hit_ratio_by_tier"]["blocks"],
            "disk_read_busy_s": round(busy["disk-read"], 6),
            "disk_busy_s": round(busy["disk-read"] + busy["disk-write"], 6),
            "double_reads": sim.counters.double_reads + st.get("double_reads", 0),
            "promoted_blocks": st.get("prefetched_blocks", 0), "used_blocks": st.get("prefetch_used_blocks", 0),
            "evicted_unused_blocks": st.get("prefetch_evicted_unused_blocks", 0),
            "cancelled_blocks": st.get("prefetch_cancelled_blocks", 0),
            "joined_blocks": st.get("prefetch_joined_blocks", 0), "moves": st.get("prefetch_moves", 0),
            "promotion_latency_ms_mean": (round(st["promotion_latency_s"] / st["prefetch_moves"] * 1e3, 3)
                                          if st.get("prefetch_moves") else None),
            "coverage": doc["prefetch"]["coverage"]}


def _gap(off: float, on: float, best: float) -> float | None:
    return round((off - on) / (off - best), 4) if off - best > 1e-9 else None


def sweep(kind: str, requests: int, seed: int) -> list[dict[str, Any]]:
    """The three runs at each load of one workload."""
    from dataclasses import replace

    from kvtier.scheduler.replay import workloads
    from kvtier.scheduler.replay.simulate import SimSettings, prepare, simulate

    workload = prepare(workloads.generate(kind, requests, seed), SimSettings())
    u = workload.unique_blocks
    base = SimSettings(gpu_blocks=max(1, round(u * GPU_FRACTION)), host_blocks=max(1, round(u * HOST_FRACTION)),
                       disk_blocks=u)
    rows = []
    for load in LOADS:
        s = replace(base, time_scale=workload.auto_time_scale(load))
        off = _figures(simulate(workload, replace(s, prefetch=False)), workload)
        on = _figures(simulate(workload, s), workload)
        best = _figures(simulate(workload, replace(s, prefetch=False, host_blocks=u)), workload)
        t_off, t_on, t_best = off["ttft_ms"], on["ttft_ms"], best["ttft_ms"]
        rows.append({
            "workload": kind, "load": load, "unique_blocks": u, "gpu_blocks": base.gpu_blocks,
            "host_blocks": base.host_blocks, "off": off, "on": on, "all_host": {"ttft_ms": t_best},
            "p50_ratio": round(t_on["p50"] / t_off["p50"], 4), "p99_ratio": round(t_on["p99"] / t_off["p99"], 4),
            "mean_gain": round(1 - t_on["mean"] / t_off["mean"], 4),
            "p99_gain": round(1 - t_on["p99"] / t_off["p99"], 4),
            "gap_closed": {q: _gap(t_off[q], t_on[q], t_best[q]) for q in ("p50", "p90", "p99", "mean")},
            "disk_busy_ratio": round(on["disk_busy_s"] / off["disk_busy_s"], 4) if off["disk_busy_s"] else None,
            "disk_read_busy_ratio": (round(on["disk_read_busy_s"] / off["disk_read_busy_s"], 4)
                                     if off["disk_read_busy_s"] else None)})
    return rows


def demo_ratio() -> dict[str, Any]:
    """`make demo`'s simulation (`kvtier replay` with no argument) with and without prefetch."""
    from dataclasses import replace

    from kvtier.scheduler.replay import workloads
    from kvtier.scheduler.replay.simreport import summarize
    from kvtier.scheduler.replay.simulate import SimSettings, prepare, simulate

    settings = SimSettings()
    workload = prepare(workloads.generate(*DEMO, 0), settings)
    on = summarize(simulate(workload, settings), workload)["ttft_ms"]
    off = summarize(simulate(workload, replace(settings, prefetch=False)), workload)["ttft_ms"]
    return {"on_ttft_ms": on, "off_ttft_ms": off, "p50_ratio": round(on["p50"] / off["p50"], 4)}


def run(args: argparse.Namespace) -> int:
    from kvtier.tiers.errors import ConfigError

    from kvtier.scheduler.bench import common as bu

    requests = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS)
    if requests < 10:
        raise ConfigError(f"--requests: {requests}; expected an int >= 10")
    began = time.perf_counter()
    rows = [row for kind in KINDS for row in sweep(kind, requests, args.seed)]
    demo = demo_ratio()
    at_top = [r for r in rows if r["load"] == LOADS[-1]]
    ons = [r["on"] for r in rows]
    promoted = sum(o["promoted_blocks"] for o in ons)
    results: dict[str, Any] = {
        "worst_p50_ratio": max(r["p50_ratio"] for r in rows),
        "worst_p99_ratio": max(r["p99_ratio"] for r in rows),
        "p99_gain_at_0_9": min(r["p99_gain"] for r in at_top),
        "chat_mean_gain_at_0_9": next(r["mean_gain"] for r in at_top if r["workload"] == "chat"),
        "double_reads": sum(o["double_reads"] for o in ons),
        "promoted_used_fraction": round(sum(o["used_blocks"] for o in ons) / promoted, 4) if promoted else None,
        "disk_busy_ratio": max(r["disk_busy_ratio"] or 0.0 for r in rows),
        "disk_read_busy_ratio": max(r["disk_read_busy_ratio"] or 0.0 for r in rows),
        "demo_p50_ratio": demo["p50_ratio"],
        "gap_closed_p90": min((r["gap_closed"]["p90"] for r in at_top if r["gap_closed"]["p90"] is not None),
                              default=None),
        "gap_closed_p99": min((r["gap_closed"]["p99"] for r in at_top if r["gap_closed"]["p99"] is not None),
                              default=None),
        "requests": requests, "seed": args.seed, "loads": list(LOADS), "model": "llama-3-8b",
        "hardware": "h100-sxm", "max_batch": 16, "fractions": {"gpu": GPU_FRACTION, "host": HOST_FRACTION,
                                                                "disk": 1.0},
        "demo": demo, "runs": rows, "seconds": None, "machine": bu.machine(),
    }
    table = [{"workload": r["workload"], "load": r["load"], "p50_off": r["off"]["ttft_ms"]["p50"],
              "p50_on": r["on"]["ttft_ms"]["p50"], "p99_off": r["off"]["ttft_ms"]["p99"],
              "p99_on": r["on"]["ttft_ms"]["p99"], "p99_all_host": r["all_host"]["ttft_ms"]["p99"],
              "mean_gain": r["mean_gain"], "gap_p99": r["gap_closed"]["p99"], "promoted": r["on"]["promoted_blocks"],
              "used": r["on"]["used_blocks"], "disk_ratio": r["disk_busy_ratio"]} for r in rows]
    bu.print_table(table, list(table[0]), f"kvtier bench prefetch: {requests} requests per workload, simulated "
                                          f"llama-3-8b on h100-sxm, gpu 2% / host 5% / disk 100% of unique blocks")
    results["seconds"] = round(time.perf_counter() - began, 1)
    keys = ("worst_p50_ratio", "worst_p99_ratio", "p99_gain_at_0_9", "chat_mean_gain_at_0_9", "double_reads",
            "promoted_used_fraction", "disk_busy_ratio", "disk_read_busy_ratio", "demo_p50_ratio",
            "gap_closed_p90", "gap_closed_p99")
    print("\n" + "  ".join(f"{k} {results[k]}" for k in keys) + f"  ({results['seconds']} s)")
    bu.write_json(args.json, results)
    return 0
