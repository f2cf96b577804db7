"""Figure 4: TTFT with and without queue-driven prefetch as load rises, disk-resident working set.

The replay simulator (`kvtier.scheduler.replay.simulate`: the real Decider and prefetch admission on a
simulated engine and links; llama-3-8b on h100-sxm, 16 requests at most per batch, 64-token blocks) runs
the built-in `docqa` and `chat` workloads (`WORKLOAD_REQUESTS` requests, seed 0) with small memory tiers
(gpu 2%, host 5% of the unique blocks) and a disk tier that holds every block, so most hits must come from
disk. Arrival times are stretched so that the no-cache load is 0.3 .. 0.9; at each load three runs with
the same arrivals: prefetch off, prefetch on (admission by deadline and room, disk -> host), and a
reference whose host tier holds every block (the most prefetch could give).

The old rule's curve ("window rule": the first 8 queued requests promoted disk -> host -> gpu within a
1 GiB budget, no deadline, FIFO links) is the one measured at commit 5005006 with this very script, kept
in experiments/out/fig_prefetch_window_rule.csv and drawn for comparison.

Top row: TTFT p50 and p99 (log y); bottom row: promoted blocks that their request read before they left
host (new rule), and prefetch coverage (restored blocks found in memory when their load began).

Writes experiments/out/fig_prefetch.{csv,json,png}; prints the findings.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import replace
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
OLD_RULE_CSV = Path(__file__).resolve().parent / "out" / "fig_prefetch_window_rule.csv"
OLD_RULE = "on (1 GiB budget)"


def row(kind: str, load: float, variant: str, scale: float, doc: dict) -> dict:
    st = doc["decider"] or {}
    promoted = st.get("prefetched_blocks", 0)
    return {"workload": kind, "load": load, "prefetch": variant, "time_scale": round(scale, 4),
            "ttft_p50_ms": doc["ttft_ms"]["p50"], "ttft_p99_ms": doc["ttft_ms"]["p99"],
            "ttft_mean_ms": doc["ttft_ms"]["mean"], "queue_p50_ms": doc["queue_ms"]["p50"],
            "prefill_p50_ms": doc["prefill_ms"]["p50"], "block_hit_ratio": doc["block_hit_ratio"],
            "gpu_hit": doc["hit_ratio_by_tier"]["blocks"]["gpu"], "host_hit": doc["hit_ratio_by_tier"]["blocks"]["host"],
            "disk_hit": doc["hit_ratio_by_tier"]["blocks"]["disk"], "prefetch_coverage": doc["prefetch"]["coverage"],
            "prefetched_blocks": promoted,
            "used_fraction": round(st.get("prefetch_used_blocks", 0) / promoted, 4) if promoted else None,
            "disk_read_busy_s": doc["link_busy_s"].get("disk-read"),
            "prefill_over_plan_p90_ms": doc["prefill_over_plan_ms"]["p90"], "sim_wall_s": doc["wall_s"]}


def old_rule_rows() -> list[dict]:
    with OLD_RULE_CSV.open() as f:
        return [{**r, "load": float(r["load"]), "ttft_p50_ms": float(r["ttft_p50_ms"]),
                 "ttft_p99_ms": float(r["ttft_p99_ms"]), "prefetch_coverage": float(r["prefetch_coverage"] or 0)}
                for r in csv.DictReader(f) if r["prefetch"] == OLD_RULE]


def main() -> None:
    start = time.perf_counter()
    rows, meta = [], {}
    for kind in KINDS:
        workload = prepare(workloads.generate(kind, WORKLOAD_REQUESTS, 0), SimSettings())
        u = workload.unique_blocks
        caps = {"gpu_blocks": max(1, round(u * GPU_FRACTION)), "host_blocks": max(1, round(u * HOST_FRACTION)),
                "disk_blocks": u}
        meta[kind] = {"requests": WORKLOAD_REQUESTS, "unique_blocks": u, "block_tokens": workload.block_tokens,
                      "no_cache_load_at_scale_1": workload.no_cache_load, **caps}
        for load in LOADS:
            scale = workload.auto_time_scale(load)
            s = SimSettings(time_scale=scale, **caps)
            for variant, settings in (("off", replace(s, prefetch=False)), ("on", s),
                                      ("all in host", replace(s, prefetch=False, host_blocks=u))):
                rows.append(row(kind, load, variant, scale, summarize(simulate(workload, settings), workload)))
    write_csv("fig_prefetch.csv", rows)
    old = old_rule_rows()
    write_json("fig_prefetch.json", {"meta": meta, "model": "llama-3-8b", "hardware": "h100-sxm", "max_batch": 16,
                                     "rows": rows, "window_rule_rows": old})

    plt = pyplot()
    fig, axes = plt.subplots(2, len(KINDS), figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    styles = {"off": "C0", "on": "C2", "all in host": "C7", "window rule": "C3"}
    for j, kind in enumerate(KINDS):
        top, bottom = axes[0][j], axes[1][j]
        series = {v: [r for r in rows if r["workload"] == kind and r["prefetch"] == v] for v in ("off", "on", "all in host")}
        series["window rule"] = [r for r in old if r["workload"] == kind]
        for name, sel in series.items():
            xs = [r["load"] for r in sel]
            label = {"on": "prefetch (deadline + room)", "window rule": "prefetch, old window rule"}.get(name, name)
            top.plot(xs, [r["ttft_p50_ms"] for r in sel], "o-", color=styles[name], label=f"{label} p50")
            top.plot(xs, [r["ttft_p99_ms"] for r in sel], "s--", color=styles[name], label=f"{label} p99")
        on = series["on"]
        bottom.plot([r["load"] for r in on], [r["used_fraction"] or 0 for r in on], "o-", color=styles["on"],
                    label="promoted blocks used (new rule)")
        bottom.plot([r["load"] for r in on], [r["prefetch_coverage"] or 0 for r in on], "^:", color=styles["on"],
                    label="coverage (new rule)")
        bottom.plot([r["load"] for r in series["window rule"]], [r["prefetch_coverage"] for r in series["window rule"]],
                    "^:", color=styles["window rule"], label="coverage (old rule, gpu)")
        m = meta[kind]
        top.set_yscale("log")
        top.set_ylabel("TTFT (ms)")
        top.set_title(f"{kind}: {WORKLOAD_REQUESTS:,} requests, {m['unique_blocks']:,} unique blocks\n"
                      f"gpu {m['gpu_blocks']:,} / host {m['host_blocks']:,} / disk {m['disk_blocks']:,} blocks", fontsize=8)
        bottom.set_ylim(0, 1.05)
        bottom.set_ylabel("fraction")
        bottom.set_xlabel("no-cache load (arrival-rate scale)")
        if j == 0:
            top.legend(fontsize=6, ncol=2)
            bottom.legend(fontsize=6)
    fig.suptitle("Queue-driven prefetch vs load, disk-resident working set (simulated: llama-3-8b, h100-sxm)")
    fig.tight_layout()
    fig.savefig(out_path("fig_prefetch.png"))

    def pick(kind: str, load: float, variant: str) -> dict:
        return next(x for x in rows if x["workload"] == kind and x["load"] == load and x["prefetch"] == variant)

    parts = []
    for kind in KINDS:
        off, on, best = (pick(kind, LOADS[-1], v) for v in ("off", "on", "all in host"))
        was = next(r for r in old if r["workload"] == kind and r["load"] == LOADS[-1])
        parts.append(f"{kind} at load {LOADS[-1]}: TTFT p50/p99 off {off['ttft_p50_ms']:.0f}/{off['ttft_p99_ms']:.0f} ms, "
                     f"on {on['ttft_p50_ms']:.0f}/{on['ttft_p99_ms']:.0f} ms (all in host {best['ttft_p50_ms']:.0f}/"
                     f"{best['ttft_p99_ms']:.0f}; old rule {was['ttft_p50_ms']:.0f}/{was['ttft_p99_ms']:.0f}), mean "
                     f"{off['ttft_mean_ms']:.0f} -> {on['ttft_mean_ms']:.0f} ms, {on['prefetched_blocks']} blocks "
                     f"promoted, {on['used_fraction']} used")
    worst = max(pick(k, x, "on")["ttft_p99_ms"] / pick(k, x, "off")["ttft_p99_ms"] for k in KINDS for x in LOADS)
    print("findings: " + "; ".join(parts) + f"; worst p99 on/off over every load {worst:.3f}; "
          f"run {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
