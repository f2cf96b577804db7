"""Figure 5: does zstd pay on the disk tier? Ratio vs decode speed on real KV, and the effective restore
bandwidth that results.

Real KV: SmolLM2-135M-Instruct (the packaged GGUF, `kvtier models prepare smollm2-135m`) prefilled on a
fixed 1,024-token text, its DynamicCache cut into kvtier blocks of 64 tokens, in fp32 and cast to bf16;
random bytes as the floor. Codecs: zstd at levels 1, 3 and 9, with and without the byte-plane shuffle
(for 2-byte dtypes; for fp32 the shuffle splits 4 planes). The effective restore bandwidth of a cold
disk read is min(disk GB/s x ratio, decode GB/s) (read and decode pipelined), with the disk's cold
sequential read measured in the same run on this machine.

Writes experiments/out/fig_compression.{csv,png}; prints the findings.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import out_path, pyplot, write_csv  # noqa: E402

import torch  # noqa: E402

from kvtier.scheduler.engines.hf.kv import HFKVBuffer, spec_for_model  # noqa: E402

from kvtier.scheduler.engines.hf.generate import prefill  # noqa: E402
from kvtier.scheduler.engines.models import build_random_llama, prepare_model  # noqa: E402
from kvtier.tiers.codecs import Codec  # noqa: E402
from kvtier.tiers.coldcache import cold_sequential_read_s, evict_file, write_file  # noqa: E402
from kvtier.tiers.disk.bench import codec_figures  # noqa: E402

TOKENS = 1024


def real_kv_blocks() -> tuple[dict[str, tuple], str]:
    """Blocks of real KV in fp32 and bf16 (SmolLM2 when it can be prepared, else a random tiny Llama)."""
    try:
        prepared = prepare_model("smollm2-135m")
        model, source = prepared.load_model(), "SmolLM2-135M-Instruct"
        tok = prepared.load_tokenizer()
        text = (Path(__file__).read_text() * 4)
        ids = torch.tensor(tok(text)["input_ids"][:TOKENS])
        revision = prepared.weights_revision
    except Exception as err:  # no transformers / GGUF here: the figure still runs, on random weights
        print(f"(SmolLM2 unavailable: {err}; using a random-weight tiny Llama)")
        model, source, revision = build_random_llama(num_layers=4, hidden_size=256, num_heads=4), "random tiny Llama", "random-0"
        ids = torch.randint(0, 256, (TOKENS,))
    torch.set_num_threads(2)
    _, cache = prefill(model, ids)
    spec = spec_for_model(model, revision, block_tokens=64)
    buf = HFKVBuffer.from_cache(cache, spec)
    n = TOKENS // 64
    blocks = torch.empty((n, *spec.block_shape), dtype=spec.torch_dtype)
    buf.read_blocks(list(range(n)), blocks, (0, spec.num_layers))
    bf16 = spec.with_(dtype="bfloat16")
    return {"fp32": (spec, list(blocks)), "bf16": (bf16, list(blocks.to(torch.bfloat16)))}, source


def main() -> None:
    data, source = real_kv_blocks()
    spec8 = data["fp32"][0].with_(dtype="uint8")
    data["random bytes"] = (spec8, [torch.randint(0, 256, (spec8.bytes_per_block,), dtype=torch.uint8)
                                    for _ in range(8)])
    with tempfile.TemporaryDirectory(dir=".") as d:
        f = os.path.join(d, "seq.bin")
        write_file(f, 256 << 20)
        evict_file(f)
        disk_gbps = (256 << 20) / cold_sequential_read_s(f) / 1e9
    rows = []
    for name, (spec, blocks) in data.items():
        for level in (1, 3, 9):
            figs = codec_figures(spec, blocks, repeats=2, level=level, codecs=(Codec.ZSTD, Codec.ZSTD_SHUFFLE))
            for codec, fig in figs.items():
                eff = min(disk_gbps * fig["ratio"], fig["decode_gbps"])
                rows.append({"data": name, "codec": codec, "level": level, "ratio": round(fig["ratio"], 3),
                             "decode_gbps": round(fig["decode_gbps"], 3), "encode_gbps": round(fig["encode_gbps"], 3),
                             "effective_restore_gbps": round(eff, 3), "uncompressed_gbps": round(disk_gbps, 3)})
    write_csv("fig_compression.csv", rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"fp32": "o", "bf16": "s", "random bytes": "x"}
    for r in rows:
        color = "C0" if r["codec"] == "zstd" else "C1"
        axes[0].scatter(r["ratio"], r["decode_gbps"], marker=markers[r["data"]], color=color)
        axes[0].annotate(f"{r['data']} L{r['level']}", (r["ratio"], r["decode_gbps"]), fontsize=6)
    axes[0].set_xlabel("compression ratio")
    axes[0].set_ylabel("decode GB/s (1 thread)")
    axes[0].set_yscale("log")
    axes[0].set_title(f"zstd (blue) vs zstd + shuffle (orange) on real KV of {source}")
    labels = [f"{r['data']}\n{r['codec']} L{r['level']}" for r in rows if r["data"] != "random bytes"]
    vals = [r["effective_restore_gbps"] for r in rows if r["data"] != "random bytes"]
    axes[1].barh(range(len(vals)), vals, color=["C0" if "shuffle" not in l else "C1" for l in labels])
    axes[1].axvline(disk_gbps, color="k", ls="--", label=f"uncompressed cold read {disk_gbps:.2f} GB/s")
    axes[1].set_yticks(range(len(vals)), labels, fontsize=6)
    axes[1].set_xlabel("effective disk restore GB/s = min(disk x ratio, decode)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path("fig_compression.png"))
    best = max((r for r in rows if r["data"] == "bf16"), key=lambda r: r["effective_restore_gbps"])
    f32 = max((r for r in rows if r["data"] == "fp32"), key=lambda r: r["ratio"])
    print(f"findings: on real {source} KV, bf16 compresses best with {best['codec']} level {best['level']} "
          f"(ratio {best['ratio']}, decode {best['decode_gbps']} GB/s): effective restore {best['effective_restore_gbps']} "
          f"GB/s against {disk_gbps:.2f} GB/s uncompressed; fp32 at best ratio {f32['ratio']} ({f32['codec']} "
          f"level {f32['level']}).")


if __name__ == "__main__":
    main()
