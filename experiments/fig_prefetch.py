"""Figure 4: TTFT with and without queue-driven prefetch as load rises, disk-resident working set.

The replay simulator (`kvtier.scheduler.replay.simulate`: the real Decider and prefetcher on a simulated
engine; llama-3-8b on h100-sxm, 16 requests at most per batch, 64-token blocks) runs the built-in
`docqa` and `chat` workloads (`WORKLOAD_REQUESTS` requests, seed 0) with small memory tiers (gpu 2%, host
5% of the unique blocks) and a disk tier that holds every block, so most hits must come from disk.
Arrival times are stretched so that the no-cache load is 0.3 .. 0.9; at each load three runs: prefetch
off, prefetch on with the default in-flight budget (1 GiB), and prefetch on with a 128 MiB budget.
Top row: TTFT p50 and p99 (log y); bottom row: prefetch coverage (restored blocks that a prefetch had
already brought up before their request's prefill started; drawn for the prefetch runs only). The CSV
also has the disk-read link's busy time and the prefill's overrun of its plan (link contention: the
simulator's links are FIFO, so a prefill's Load waits behind queued prefetches on the disk link).

Writes experiments/out/fig_prefetch.{csv,json,png}; prints the findings.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import out_path, pyplot, write_csv, write_json  # noqa: E402

from kvtier.scheduler.replay import workloads  # noqa: E402
from kvtier.scheduler.replay.simreport import summarize  # noqa: E402
from kvtier.scheduler.replay.simulate import SimSettings, prepare, simulate  # noqa: E402

KINDS = ["docqa", "chat"]
WORKLOAD_REQUESTS = 1500
LOADS = [0.3, 0.5, 0.7, 0.9]
GPU_FRACTION, HOST_FRACTION = 0.02, 0.05
SMALL_BUDGET = 128 << 20
VARIANTS = [("off", {"prefetch": False}), ("on (1 GiB budget)", {"prefetch": True}),
            ("on (128 MiB budget)", {"prefetch": True, "prefetch_budget_bytes": SMALL_BUDGET})]


def main() -> None:
    start = time.perf_counter()
    rows, meta = [], {}
    for kind in KINDS:
        reqs = workloads.generate(kind, WORKLOAD_REQUESTS, 0)
        workload = prepare(reqs, SimSettings())
        u = workload.unique_blocks
        caps = {"gpu_blocks": max(1, round(u * GPU_FRACTION)), "host_blocks": max(1, round(u * HOST_FRACTION)),
                "disk_blocks": u}
        meta[kind] = {"requests": WORKLOAD_REQUESTS, "unique_blocks": u, "block_tokens": workload.block_tokens,
                      "no_cache_load_at_scale_1": workload.no_cache_load, **caps}
        for load in LOADS:
            scale = workload.auto_time_scale(load)
            for variant, extra in VARIANTS:
                s = SimSettings(time_scale=scale, **caps, **extra)
                doc = summarize(simulate(workload, s), workload)
                rows.append({"workload": kind, "load": load, "prefetch": variant, "time_scale": round(scale, 4),
                             "ttft_p50_ms": doc["ttft_ms"]["p50"], "ttft_p99_ms": doc["ttft_ms"]["p99"],
                             "queue_p50_ms": doc["queue_ms"]["p50"], "prefill_p50_ms": doc["prefill_ms"]["p50"],
                             "block_hit_ratio": doc["block_hit_ratio"],
                             "gpu_hit": doc["hit_ratio_by_tier"]["blocks"]["gpu"],
                             "host_hit": doc["hit_ratio_by_tier"]["blocks"]["host"],
                             "disk_hit": doc["hit_ratio_by_tier"]["blocks"]["disk"],
                             "prefetch_coverage": doc["prefetch"]["coverage"],
                             "prefetched_blocks": doc["prefetch"]["prefetched_blocks"],
                             "disk_read_busy_s": doc["link_busy_s"].get("disk-read"),
                             "prefill_over_plan_p90_ms": doc["prefill_over_plan_ms"]["p90"],
                             "sim_wall_s": doc["wall_s"]})
    write_csv("fig_prefetch.csv", rows)
    write_json("fig_prefetch.json", {"meta": meta, "model": "llama-3-8b", "hardware": "h100-sxm",
                                     "max_batch": 16, "rows": rows})

    plt = pyplot()
    fig, axes = plt.subplots(2, len(KINDS), figsize=(11, 7), sharex=True,
                             gridspec_kw={"height_ratios": [2, 1]})
    for j, kind in enumerate(KINDS):
        top, bottom = axes[0][j], axes[1][j]
        for i, (variant, _) in enumerate(VARIANTS):
            sel = [r for r in rows if r["workload"] == kind and r["prefetch"] == variant]
            xs = [r["load"] for r in sel]
            top.plot(xs, [r["ttft_p50_ms"] for r in sel], f"C{i}o-", label=f"prefetch {variant} p50")
            top.plot(xs, [r["ttft_p99_ms"] for r in sel], f"C{i}s--", label=f"prefetch {variant} p99")
            if variant != "off":  # without prefetch the "coverage" is only blocks that were in the gpu tier anyway
                bottom.plot(xs, [r["prefetch_coverage"] or 0.0 for r in sel], f"C{i}o-", label=f"prefetch {variant}")
        m = meta[kind]
        top.set_yscale("log")
        top.set_ylabel("TTFT (ms)")
        top.set_title(f"{kind}: {WORKLOAD_REQUESTS:,} requests, {m['unique_blocks']:,} unique blocks\n"
                      f"gpu {m['gpu_blocks']:,} / host {m['host_blocks']:,} / disk {m['disk_blocks']:,} blocks",
                      fontsize=8)
        bottom.set_ylim(0, 1.05)
        bottom.set_ylabel("prefetch coverage")
        bottom.set_xlabel("no-cache load (arrival-rate scale)")
        if j == 0:
            top.legend(fontsize=6, ncol=1)
            bottom.legend(fontsize=6)
    fig.suptitle("Queue-driven prefetch vs load, disk-resident working set (simulated: llama-3-8b, h100-sxm)")
    fig.tight_layout()
    fig.savefig(out_path("fig_prefetch.png"))

    def r(kind: str, load: float, variant: str) -> dict:
        return next(x for x in rows if x["workload"] == kind and x["load"] == load and x["prefetch"] == variant)

    parts = []
    for kind in KINDS:
        off, on, small = (r(kind, LOADS[-1], v) for v, _ in VARIANTS)
        lo_off, lo_on = r(kind, LOADS[0], VARIANTS[0][0]), r(kind, LOADS[0], VARIANTS[1][0])
        parts.append(f"{kind} at load {LOADS[-1]}: TTFT p50/p99 off {off['ttft_p50_ms']:.0f}/{off['ttft_p99_ms']:.0f} ms, "
                     f"on {on['ttft_p50_ms']:.0f}/{on['ttft_p99_ms']:.0f} ms (coverage {on['prefetch_coverage']:.2f}), "
                     f"128 MiB budget {small['ttft_p50_ms']:.0f}/{small['ttft_p99_ms']:.0f} ms "
                     f"(coverage {small['prefetch_coverage']:.2f}), disk-read busy off/on "
                     f"{off['disk_read_busy_s']:.0f}/{on['disk_read_busy_s']:.0f} s; at load {LOADS[0]} off "
                     f"{lo_off['ttft_p50_ms']:.0f}/{lo_off['ttft_p99_ms']:.0f} vs on "
                     f"{lo_on['ttft_p50_ms']:.0f}/{lo_on['ttft_p99_ms']:.0f} ms")
    print("findings: " + "; ".join(parts) + f"; run {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
