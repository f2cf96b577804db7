"""Figure 6: achieved copy bandwidth vs block size: naive per-layer copies vs kvtier's batched path.

Geometry of llama-3-8b in fp16 (128 KiB per token), 256 MiB moved per measurement, blocks of 4 to
256 tokens, on this machine (host -> "gpu" pool; without CUDA both pools are CPU memory):
- naive: one `copy_` per layer per K/V per block, issued from Python (what a per-layer engine hook does);
- kvtier batched: `Transferer.move`, one copy per block (slots shuffled: no run coalescing);
- kvtier layer groups: the same in layer-group order (4 groups), as loads overlapped with compute use;
- limit: one `copy_` of the same bytes.
Each point is the median of 5 interleaved repeats. Writes experiments/out/fig_granularity.{csv,png}.
"""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import out_path, pyplot, write_csv  # noqa: E402

import torch  # noqa: E402

from kvtier.scheduler.bench.common import interleave, machine  # noqa: E402
from kvtier.tiers.pool import GpuTier, HostTier  # noqa: E402
from kvtier.tiers.spec import KVSpec  # noqa: E402
from kvtier.tiers.transfer import Transferer  # noqa: E402

MIB = 256
BLOCKS = [4, 8, 16, 32, 64, 128, 256]
REPEATS = 5


def measure(block_tokens: int) -> dict:
    spec = KVSpec.from_preset("llama-3-8b", dtype="float16", block_tokens=block_tokens, weights_revision="fig")
    n = MIB * 2**20 // spec.bytes_per_block
    host, gpu = HostTier(spec, n * spec.bytes_per_block), GpuTier(spec, n * spec.bytes_per_block)
    host.pool.data.random_(0, 256)
    src_big, dst_big = torch.empty(n * spec.bytes_per_block, dtype=torch.uint8), torch.empty(
        n * spec.bytes_per_block, dtype=torch.uint8)
    hs, gs = list(range(n)), list(range(n))
    random.Random(0).shuffle(hs)
    random.Random(1).shuffle(gs)
    keys = [i.to_bytes(16, "little") for i in range(n)]
    transfer = Transferer({"host": host, "gpu": gpu})
    src_typed = [host.pool.blocks(s, 1)[0] for s in hs]
    dst_typed = [gpu.pool.blocks(d, 1)[0] for d in gs]

    def naive() -> None:
        for s, d in zip(src_typed, dst_typed):
            for layer in range(spec.num_layers):
                for kv in range(spec.kv_factor):
                    d[layer, kv].copy_(s[layer, kv])

    fns = {"limit": lambda: dst_big.copy_(src_big),
           "batched": lambda: transfer.move("host", "gpu", keys, hs, gs).wait(),
           "layer groups (4)": lambda: transfer.move("host", "gpu", keys, hs, gs, num_groups=4).wait(),
           "naive per layer per K/V": naive}
    try:
        times = interleave(fns, REPEATS)
    finally:
        transfer.close()
    nbytes = n * spec.bytes_per_block
    row = {"block_tokens": block_tokens, "block_kib": spec.bytes_per_block // 1024, "blocks": n,
           "copies_naive": n * spec.num_layers * spec.kv_factor}
    for name, ts in times.items():
        row[f"{name} GB/s"] = round(nbytes / statistics.median(ts) / 1e9, 2)
    return row


def main() -> None:
    torch.set_num_threads(2)
    rows = [measure(bt) for bt in BLOCKS]
    write_csv("fig_granularity.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, style in (("limit", "k--"), ("batched", "C0o-"), ("layer groups (4)", "C2s-"),
                        ("naive per layer per K/V", "C3^-")):
        ax.plot([r["block_tokens"] for r in rows], [r[f"{name} GB/s"] for r in rows], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per block (llama-3-8b fp16, 128 KiB/token)")
    ax.set_ylabel("achieved GB/s")
    m = machine()
    ax.set_title(f"Copy granularity, 256 MiB per point ({m.get('cpu', '?')[:40]}, {m.get('device', 'cpu')})", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path("fig_granularity.png"))
    r16 = next(r for r in rows if r["block_tokens"] == 16)
    print(f"findings: at 16 tokens per block, batched {r16['batched GB/s']} GB/s and naive per-layer "
          f"{r16['naive per layer per K/V GB/s']} GB/s against the one-copy limit {r16['limit GB/s']} GB/s "
          f"({r16['copies_naive']} naive copies for 256 MiB)")


if __name__ == "__main__":
    main()
