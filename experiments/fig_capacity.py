"""Figure 3: hit ratio and TTFT vs host-tier capacity on the shared Mooncake conversation trace, per policy.

Left panel: prefix hit ratio (hit-only replay, `kvtier.scheduler.replay.hitonly`, whole trace, one cache of
C blocks) for each policy (lru, arc, s3fifo, suffix-arc and the default auto) at host capacities C, with
the bounds: the infinite-cache ratio and `opt` (the exact offline optimum under the prefix rule) at each C. Right panel: TTFT p50 and p99 (log y) from the replay simulator
(`kvtier.scheduler.replay.simulate`: the real Decider on a simulated engine; llama-3-8b on h100-sxm,
16 requests at most per batch) on the first `SIM_REQUESTS` requests of the same trace, with a small
fixed GPU tier, the host tier of C blocks and no disk (so the host tier is the last level and its size
decides what is kept), arrival times stretched to a no-cache load of 0.7, prefetch on. The no-cache
TTFT is drawn as a reference.

Writes experiments/out/fig_capacity.{csv,json,png}; prints the findings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import out_path, pyplot, write_csv, write_json  # noqa: E402

from kvtier.scheduler.cli.replay import load_requests  # noqa: E402
from kvtier.scheduler.replay import hitonly  # noqa: E402
from kvtier.scheduler.replay.simreport import summarize  # noqa: E402
from kvtier.scheduler.replay.simulate import SimSettings, prepare, simulate  # noqa: E402
from kvtier.scheduler.replay.traces import MOONCAKE_TRACE  # noqa: E402

TRACE = MOONCAKE_TRACE
POLICIES = ["lru", "arc", "s3fifo", "suffix-arc", "auto"]
CAPACITIES = [2000, 6000, 20000, 60000]
SIM_REQUESTS = 3000  # a full-trace simulation takes 15-40 s here; 16 of them would not fit in minutes
GPU_BLOCKS = 500
TARGET_LOAD = 0.7


def _trace_path() -> Path:
    if not TRACE.exists():
        raise SystemExit(f"fig_capacity: trace not found: {TRACE} (the Mooncake conversation trace)")
    return TRACE


def main() -> None:
    start = time.perf_counter()
    args = argparse.Namespace(trace=str(_trace_path()), format=None, skip_bad=False, requests=None, seed=0,
                              block_tokens=None)
    trace, name = load_requests(args)
    reqs = trace.requests

    # hit-only: whole trace, each policy at each capacity, the infinite and opt bounds
    work = hitonly.HitOnlyWorkload.from_requests(reqs)
    sweep = hitonly.sweep(work, CAPACITIES, POLICIES, ("opt",), jobs=2)
    hit = {(r.policy, r.cache_blocks): r.block_hit_ratio for r in sweep.results}

    # simulation: trace prefix, gpu fixed, host = C, no disk
    base = SimSettings(gpu_blocks=GPU_BLOCKS, disk_blocks=0, target_load=TARGET_LOAD)
    workload = prepare(reqs[:SIM_REQUESTS], base)
    scale = workload.auto_time_scale(TARGET_LOAD)
    nocache = summarize(simulate(workload, SimSettings(gpu_blocks=GPU_BLOCKS, host_blocks=0, disk_blocks=0,
                                                       time_scale=scale, cache=False)), workload)
    rows = []
    for c in CAPACITIES:
        for policy in POLICIES:
            s = SimSettings(gpu_blocks=GPU_BLOCKS, host_blocks=c, disk_blocks=0, policy=policy, time_scale=scale)
            doc = summarize(simulate(workload, s), workload)
            rows.append({"policy": policy, "host_blocks": c,
                         "hit_ratio_full_trace": round(hit[(policy, c)], 4),
                         "opt_full_trace": round(sweep.opt[c], 4),
                         "infinite_full_trace": round(sweep.infinite, 4),
                         "sim_block_hit_ratio": doc["block_hit_ratio"],
                         "ttft_p50_ms": doc["ttft_ms"]["p50"], "ttft_p99_ms": doc["ttft_ms"]["p99"],
                         "prefetch_coverage": doc["prefetch"]["coverage"], "sim_wall_s": doc["wall_s"]})
    write_csv("fig_capacity.csv", rows)
    meta = {"trace": name, "requests": len(reqs), "unique_blocks": len({k for ks in work.keys for k in ks}),
            "sim_requests": SIM_REQUESTS, "sim_unique_blocks": workload.unique_blocks,
            "block_tokens": workload.block_tokens, "model": base.model, "hardware": base.hardware,
            "gpu_blocks": GPU_BLOCKS, "disk_blocks": 0, "time_scale": scale, "target_load": TARGET_LOAD,
            "infinite": sweep.infinite, "opt": sweep.opt,
            "no_cache_ttft_ms": nocache["ttft_ms"]}
    write_json("fig_capacity.json", {"meta": meta, "rows": rows})

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, policy in enumerate(POLICIES):
        sel = [r for r in rows if r["policy"] == policy]
        xs = [r["host_blocks"] for r in sel]
        ax1.plot(xs, [r["hit_ratio_full_trace"] for r in sel], f"C{i}o-", label=policy)
        ax2.plot(xs, [r["ttft_p50_ms"] for r in sel], f"C{i}o-", label=f"{policy} p50")
        ax2.plot(xs, [r["ttft_p99_ms"] for r in sel], f"C{i}s--", label=f"{policy} p99")
    ax1.plot(CAPACITIES, [sweep.opt[c] for c in CAPACITIES], "k^:", label="opt (bound)")
    ax1.axhline(sweep.infinite, color="k", lw=1.2, label=f"infinite cache ({sweep.infinite:.3f})")
    ax1.set_xscale("log")
    ax1.set_ylim(0, min(1.0, sweep.infinite * 1.15))
    ax1.set_xlabel("host-tier capacity (blocks of 512 tokens)")
    ax1.set_ylabel("prefix block hit ratio")
    ax1.set_title(f"Hit-only, whole trace ({len(reqs):,} requests)")
    ax1.legend(fontsize=7, loc="lower right")
    ax2.axhline(nocache["ttft_ms"]["p50"], color="grey", lw=1, label="no cache p50")
    ax2.axhline(nocache["ttft_ms"]["p99"], color="grey", lw=1, ls="--", label="no cache p99")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("host-tier capacity (blocks of 512 tokens)")
    ax2.set_ylabel("TTFT (ms)")
    ax2.set_title(f"Simulated TTFT, first {SIM_REQUESTS:,} requests, load {TARGET_LOAD}\n"
                  f"(llama-3-8b, h100-sxm, gpu {GPU_BLOCKS} blocks, no disk)", fontsize=8)
    ax2.legend(fontsize=6, ncol=2, loc="center right")
    for ax in (ax1, ax2):
        ax.set_xticks(CAPACITIES, [f"{c:,}" for c in CAPACITIES])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    fig.suptitle("Capacity sweep on the Mooncake conversation trace")
    fig.tight_layout()
    fig.savefig(out_path("fig_capacity.png"))

    def r(policy: str, c: int) -> dict:
        return next(x for x in rows if x["policy"] == policy and x["host_blocks"] == c)

    lo, hi = CAPACITIES[0], CAPACITIES[-1]
    best = max(POLICIES, key=lambda p: r(p, 20000)["hit_ratio_full_trace"])
    print(f"findings: whole trace, hit ratio rises from {r('lru', lo)['hit_ratio_full_trace']:.3f} (lru) at "
          f"{lo:,} blocks to {r('lru', hi)['hit_ratio_full_trace']:.3f} at {hi:,} (auto "
          f"{r('auto', lo)['hit_ratio_full_trace']:.3f} -> {r('auto', hi)['hit_ratio_full_trace']:.3f}; opt "
          f"{sweep.opt[lo]:.3f} -> {sweep.opt[hi]:.3f}, infinite {sweep.infinite:.3f}); at 20,000 blocks "
          f"{best} is best ({r(best, 20000)['hit_ratio_full_trace']:.3f} vs lru "
          f"{r('lru', 20000)['hit_ratio_full_trace']:.3f}). Simulated TTFT (first {SIM_REQUESTS:,} requests, "
          f"load {TARGET_LOAD}, lru): p50 {r('lru', lo)['ttft_p50_ms']:.0f} -> {r('lru', hi)['ttft_p50_ms']:.0f} ms, "
          f"p99 {r('lru', lo)['ttft_p99_ms']:.0f} -> {r('lru', hi)['ttft_p99_ms']:.0f} ms from {lo:,} to "
          f"{hi:,} host blocks (no cache: p50 {nocache['ttft_ms']['p50']:.0f}, p99 {nocache['ttft_ms']['p99']:.0f} ms); "
          f"run {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
