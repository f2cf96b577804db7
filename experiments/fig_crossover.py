"""Figure 1: restore vs recompute across prefix lengths, models, machines and source tiers (cost model).

For each model preset (MHA llama-2-7b; GQA llama-3-8b, llama-3-70b at TP=8, qwen2.5-7b; MLA deepseek-v3)
on each named hardware profile (h100-pcie5, h200, gh200, a100-pcie4), the predicted time to recompute a
prefix of 1k..128k tokens against restoring it from host RAM over the host link, from one NVMe drive,
from NVMe with zstd, and from the remote tier shared by serving replicas over a 100 Gb/s network (80%
efficiency, 100 us round trip; then the host link); plus the break-even bandwidth (restore = recompute) at 8k tokens. A second
table settles the claim that restoring KV "still does not make sense for Llama 3 70B on H100s": for
which tier and copy granularity it holds.

Writes experiments/out/fig_crossover.{csv,json,png}; prints the findings.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import out_path, pyplot, write_csv, write_json  # noqa: E402

from kvtier.scheduler.cost.hardware import load_profile  # noqa: E402
from kvtier.scheduler.cost.model import CostModel  # noqa: E402

MODELS = [("llama-2-7b", 1, "MHA"), ("llama-3-8b", 1, "GQA"), ("llama-3-70b", 8, "GQA, TP=8"),
          ("qwen2.5-7b", 1, "GQA"), ("deepseek-v3", 8, "MLA, TP=8")]
PROFILES = ["h100-pcie5", "h200", "gh200", "a100-pcie4"]
PATHS = [("host", "host RAM"), ("disk", "1 NVMe"), ("disk_zstd", "NVMe + zstd"), ("remote", "remote, 100 Gb/s")]
#: the remote tier's network: 100 Gb/s Ethernet at 80% efficiency, one 100 us round trip
NETWORK = {"remote_bytes_per_s": 100e9 / 8 * 0.8, "remote_rtt_s": 100e-6}


def with_network(profile: str):
    """The named profile with the 100 Gb/s network of the remote line."""
    return load_profile(profile).with_(**NETWORK)
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


def main() -> None:
    rows = []
    for model, tp, kind in MODELS:
        for profile in PROFILES:
            cm = CostModel.from_profile(with_network(profile), model, block_tokens=16 if model != "deepseek-v3" else 64,
                                        tp=tp)
            for n in LENGTHS:
                row = {"model": model, "attention": kind, "tp": tp, "profile": profile, "tokens": n,
                       "recompute_ms": round(cm.recompute_s(0, n) * 1e3, 3)}
                for path, _ in PATHS:
                    row[f"{path}_ms"] = round(cm.restore_tokens_s(path, n) * 1e3, 3)
                row["host_break_even_gbps"] = round(cm.break_even_bytes_per_s("host", n) / 1e9, 3)
                row["kv_bytes"] = n * cm.spec.bytes_per_token // tp
                rows.append(row)
    write_csv("fig_crossover.csv", rows)

    # the Llama-3-70B claim: H100 SXM/PCIe, TP=8, 8k prefix, per tier and copy granularity
    claim = []
    for profile in ("h100-sxm", "h100-pcie5"):
        for granularity, block_tokens in (("block", 16), ("layer-kv", 16), ("block", 64)):
            cm = CostModel.from_profile(with_network(profile), "llama-3-70b", block_tokens=block_tokens, tp=8,
                                        copy_granularity=granularity)
            rec = cm.recompute_s(0, 8192)
            for path, label in PATHS:
                t = cm.restore_tokens_s(path, 8192)
                claim.append({"profile": profile, "copy_granularity": granularity, "block_tokens": block_tokens,
                              "tier": label, "recompute_ms": round(rec * 1e3, 2), "restore_ms": round(t * 1e3, 2),
                              "speedup": round(rec / t, 2), "restore_pays": t < rec})
    write_json("fig_crossover.json", {"rows": rows, "llama3_70b_claim": claim})

    plt = pyplot()
    fig, axes = plt.subplots(len(MODELS), len(PROFILES), figsize=(13, 13), sharex=True)
    for i, (model, tp, kind) in enumerate(MODELS):
        for j, profile in enumerate(PROFILES):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == model and r["profile"] == profile]
            xs = [r["tokens"] for r in sel]
            ax.plot(xs, [r["recompute_ms"] for r in sel], "k-", lw=2, label="recompute")
            for (path, label), style in zip(PATHS, ("C0-", "C1--", "C2:", "C3-.")):
                ax.plot(xs, [r[f"{path}_ms"] for r in sel], style, label=label)
            be = next(r["host_break_even_gbps"] for r in sel if r["tokens"] == 8192)
            ax.text(0.97, 0.04, f"break-even @8k: {be:.1f} GB/s", transform=ax.transAxes, ha="right", fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if i == 0:
                ax.set_title(profile)
            if j == 0:
                ax.set_ylabel(f"{model}\n({kind})\nms")
            if i == len(MODELS) - 1:
                ax.set_xlabel("prefix tokens")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Restore vs recompute (cost model: bf16, MFU 0.5, batched whole-block copies)")
    fig.tight_layout()
    fig.savefig(out_path("fig_crossover.png"))

    def pick(model, profile, n):
        return next(r for r in rows if r["model"] == model and r["profile"] == profile and r["tokens"] == n)

    m2, m3 = pick("llama-2-7b", "a100-pcie4", 8192), pick("llama-3-8b", "h100-pcie5", 8192)
    c = {(r["profile"], r["copy_granularity"], r["block_tokens"], r["tier"]): r for r in claim}
    print("findings: "
          f"llama-3-8b on h100-pcie5, 8k tokens: recompute {m3['recompute_ms']:.0f} ms vs host {m3['host_ms']:.0f} ms, "
          f"NVMe {m3['disk_ms']:.0f} ms; llama-2-7b (MHA) on a100-pcie4: recompute {m2['recompute_ms']:.0f} ms vs "
          f"NVMe {m2['disk_ms']:.0f} ms. Llama-3-70B TP=8 on h100-sxm at 8k: batched host restore "
          f"{c[('h100-sxm', 'block', 16, 'host RAM')]['speedup']}x faster than recompute; one copy per layer per "
          f"K/V per 16-token block only {c[('h100-sxm', 'layer-kv', 16, 'host RAM')]['speedup']}x; one NVMe "
          f"{c[('h100-sxm', 'block', 16, '1 NVMe')]['speedup']}x; the remote tier over 100 Gb/s "
          f"{c[('h100-sxm', 'block', 16, 'remote, 100 Gb/s')]['speedup']}x. llama-3-8b on h100-pcie5 at 8k from the "
          f"remote: {m3['remote_ms']:.0f} ms.")


if __name__ == "__main__":
    main()
