"""`kvtier bench tiers`: tier copy and disk restore bandwidth against their limits, and key hashing.

Geometry of llama-3-8b in fp16 (128 KiB per token), blocks of 16, 64 and 256 tokens, 512 MiB per
measurement. Each figure is the median of interleaved repeats (path, limit, path, limit, ...; the memory
figures at least `MEMORY_REPEATS` but with `--quick`, each timed copy after an untimed `SETTLE_S` pause):
- host->gpu and gpu->host batched transfers (whole-block order, and layer-group order with 4 groups)
  vs one `copy_` of the same byte count; slots are shuffled so no two blocks are adjacent (no run
  coalescing flatters the figure: one copy per block);
- disk restore into host slots with a truly cold page cache (every mapping closed, pages dropped,
  residency checked) vs a cold sequential read of a file of the same size on the same file system;
- zstd with and without byte-plane shuffle: ratio and decode speed;
- hashing of 128k tokens at 16, 64 and 256 tokens per block.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

BLOCK_SIZES = (16, 64, 256)
#: repeats of each memory figure at least: they cost ~0.1 s each, and one 512 MiB copy here swings by
#: up to 1.5x from one repeat to the next (the VM's memory bandwidth), so 5 leave the median to luck
MEMORY_REPEATS = 15
#: untimed pause before each timed copy (`common.interleave`): no copy pays for the OpenMP threads the
#: previous one (a limit `copy_`) left spinning
SETTLE_S = 0.03


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per figure (default 5; "
                        f"the memory figures at least {MEMORY_REPEATS} unless --quick)")
    parser.add_argument("--mib", type=int, default=512, help="MiB moved per measurement (default 512)")
    parser.add_argument("--dir", default=None, help="directory for the disk store and the cold-read file "
                        "(default: a temp dir under the current directory's file system)")
    parser.add_argument("--no-disk", action="store_true", help="skip the disk figures")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvtier.scheduler.bench import common as bu
    from kvtier.tiers.keys import HASH_BACKEND
    from kvtier.tiers.spec import KVSpec

    if args.quick:
        args.repeats, args.mib = min(args.repeats, 3), min(args.mib, 128)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict[str, Any] = {"machine": bu.machine(), "repeats": args.repeats, "mib": args.mib, "rows": [],
                               "memory_repeats": args.repeats if args.quick else max(args.repeats, MEMORY_REPEATS)}
    base = KVSpec.from_preset("llama-3-8b", dtype="float16", weights_revision="bench")
    # every memory figure first, then the disk ones: the disk rows write and evict hundreds of MiB, and
    # the kernel's writeback and reclaim after them would land on the next memory row's copies
    for block_tokens in BLOCK_SIZES:
        spec = base.with_(block_tokens=block_tokens)
        rows = _memory_rows(spec, args.mib, results["memory_repeats"])
        results["rows"] += rows
        by = {r["path"]: r for r in rows}
        _headline(results, f"host_to_gpu_ratio{_suffix(block_tokens)}", by["host->gpu"])
        _headline(results, f"gpu_to_host_ratio{_suffix(block_tokens)}", by["gpu->host"])
        if block_tokens == 64:
            _headline(results, "host_to_gpu_ratio_layerwise", by["host->gpu layer-groups(4)"])
    for block_tokens in BLOCK_SIZES if not args.no_disk else ():
        row = _disk_row(base.with_(block_tokens=block_tokens), args.mib, args.repeats, args.dir)
        results["rows"].append(row)
        _headline(results, f"disk_read_ratio{_suffix(block_tokens)}", row)
    results["compression"] = _compression_rows(base.with_(block_tokens=64), min(args.mib, 64))
    results["hash"] = _hash_rows(args.repeats)
    results["hash_backend"] = HASH_BACKEND
    hash64 = next(r for r in results["hash"] if r["block_tokens"] == 64)
    results["hash_128k_ms"] = hash64["ms"]
    results.setdefault("spread", {})["hash_128k_ms"] = {"median": hash64["ms"], "min": hash64["min_ms"],
                                                        "max": hash64["max_ms"], "n": hash64["repeats"]}

    bu.print_table(results["rows"], ["block_tokens", "path", "ratio", "ratio_min", "ratio_max", "path_ms",
                                     "limit_ms", "limit"], "kvtier bench tiers: path vs limit (ratio = limit time / path time)")
    print()
    bu.print_table(results["compression"], ["codec", "ratio", "decode_gbps", "encode_gbps", "data"], "compression")
    print()
    bu.print_table(results["hash"], ["block_tokens", "ms", "min_ms", "max_ms"],
                   f"hashing 128k tokens (median of {results['hash'][0]['repeats']}; {HASH_BACKEND} loop)")
    print(f"\nmachine: {results['machine']}")
    bu.write_json(args.json, results)
    return 0


def _headline(results: dict[str, Any], key: str, row: dict[str, Any]) -> None:
    """Sets headline figure `key` from a ratio row, with the row's spread in `results["spread"]`."""
    results[key] = row["ratio"]
    results.setdefault("spread", {})[key] = {"median": row["ratio"], "min": row["ratio_min"],
                                             "max": row["ratio_max"], "n": row.get("repeats")}


def _suffix(block_tokens: int) -> str:
    """The JSON key suffix of a block size's figures (none for the headline 64 tokens)."""
    return "" if block_tokens == 64 else f"_{block_tokens}"


def _memory_rows(spec, mib: int, repeats: int) -> list[dict[str, Any]]:
    import torch

    from kvtier.scheduler.bench import common as bu
    from kvtier.tiers.pool import GpuTier, HostTier
    from kvtier.tiers.transfer import Transferer

    n = max(1, mib * 2**20 // spec.bytes_per_block)
    host, gpu = HostTier(spec, n * spec.bytes_per_block), GpuTier(spec, n * spec.bytes_per_block)
    host.pool.data.random_(0, 256)
    rng = random.Random(0)
    host_slots, gpu_slots = list(range(n)), list(range(n))
    rng.shuffle(host_slots)
    rng.shuffle(gpu_slots)
    keys = [i.to_bytes(16, "little") for i in range(n)]
    transfer = Transferer({"host": host, "gpu": gpu})
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    # the limit is one copy_ between the two pools' whole buffers: the same memory the batched path
    # moves between (pinned host memory and the device when CUDA is present), so the ratio measures
    # the path, not where the allocator placed two other buffers (copies between two fresh 512 MiB
    # buffers differed by up to 8% here from one pair to another)
    def limit_h2d() -> None:
        gpu.pool.data.copy_(host.pool.data, non_blocking=True)
        sync()

    def limit_d2h() -> None:
        host.pool.data.copy_(gpu.pool.data, non_blocking=True)
        sync()

    fns = {
        "limit h2d": limit_h2d,
        "host->gpu": lambda: transfer.move("host", "gpu", keys, host_slots, gpu_slots).wait(),
        "limit d2h": limit_d2h,
        "gpu->host": lambda: transfer.move("gpu", "host", keys, gpu_slots, host_slots).wait(),
        "host->gpu layer-groups(4)": lambda: transfer.move("host", "gpu", keys, host_slots, gpu_slots,
                                                           num_groups=4).wait(),
    }
    try:
        times = bu.interleave(fns, repeats, settle_s=SETTLE_S)
        # check once that the bytes arrived where they should
        host.pool.data[host_slots[0]].random_(0, 256)
        transfer.move("host", "gpu", keys, host_slots, gpu_slots).wait()
        assert torch.equal(host.pool.data[host_slots[0]], gpu.pool.data[gpu_slots[0]].cpu()), "copy mismatch"
    finally:
        transfer.close()
    rows = []
    for path, limit in (("host->gpu", "limit h2d"), ("gpu->host", "limit d2h"),
                        ("host->gpu layer-groups(4)", "limit h2d")):
        r = bu.ratio(times[limit], times[path])
        rows.append({"block_tokens": spec.block_tokens, "path": path, "limit": "one copy_ of the whole pool",
                     "blocks": n, "repeats": repeats, **r.as_dict()})
    return rows


def _disk_row(spec, mib: int, repeats: int, where: str | None) -> dict[str, Any]:
    from kvtier.tiers.disk.bench import cold_restore_vs_sequential

    fig = cold_restore_vs_sequential(where or ".", spec, mib * 2**20, repeats)
    return {"block_tokens": spec.block_tokens, "path": "disk->host (cold)", "blocks": fig["num_blocks"],
            "limit": "cold sequential read of a same-size file", "ratio": round(fig["ratio"], 4),
            "ratio_min": round(fig["ratio_min"], 4), "ratio_max": round(fig["ratio_max"], 4),
            "path_ms": round(statistics.median(fig["restore_s"]) * 1e3, 3),
            "limit_ms": round(statistics.median(fig["sequential_s"]) * 1e3, 3),
            "resident_at_open_bytes": fig["resident_at_open_bytes"], "filesystem": fig["filesystem"],
            "repeats": len(fig["restore_s"])}


def _compression_rows(spec, mib: int) -> list[dict[str, Any]]:
    import torch

    from kvtier.tiers.disk.bench import codec_figures, kv_like_blocks

    n = max(1, mib * 2**20 // spec.bytes_per_block)
    samples = {"kv-like bf16 (gaussian)": (spec.with_(dtype="bfloat16"), None),
               "kv-like fp16 (gaussian)": (spec.with_(dtype="float16"), None),
               "random bytes (floor)": (spec, torch.randint(0, 256, (n, spec.bytes_per_block), dtype=torch.uint8))}
    rows = []
    for data_name, (s, blocks) in samples.items():
        blocks = kv_like_blocks(s, n) if blocks is None else blocks
        for codec, fig in codec_figures(s, list(blocks)).items():
            rows.append({"codec": codec, "data": data_name, "ratio": round(fig["ratio"], 3),
                         "encode_gbps": round(fig["encode_gbps"], 3), "decode_gbps": round(fig["decode_gbps"], 3)})
    return rows


def _hash_rows(repeats: int) -> list[dict[str, Any]]:
    import numpy as np

    from kvtier.scheduler.bench import common as bu
    from kvtier.tiers.keys import KeyChain

    tokens = np.random.default_rng(0).integers(0, 128000, 131072, dtype=np.int32)
    rows = []
    for block_tokens in BLOCK_SIZES:
        chain = KeyChain(b"\x01" * 16, block_tokens)
        times = []
        for _ in range(max(repeats, 5) * 4):
            t0 = time.perf_counter()
            chain.keys(tokens)
            times.append(time.perf_counter() - t0)
        rows.append({"block_tokens": block_tokens, "ms": round(bu.median(times) * 1e3, 3),
                     "min_ms": round(min(times) * 1e3, 3), "max_ms": round(max(times) * 1e3, 3),
                     "repeats": len(times)})
    return rows
