"""Measurements of the disk tier that `kvtier bench tiers` reports: cold restore and codecs.

Primitives:
- `cold_restore_vs_sequential(directory, spec, total_bytes, repeats)` -> dict: the disk tier's restore of
  `total_bytes` of blocks into preallocated CPU tensors, with a truly cold page cache, against a cold
  sequential read of a file of the same size on the same file system, interleaved (A, B, A, B, ...);
  median ratio and spread.
- `codec_figures(spec, blocks, repeats)` -> dict per codec: compression ratio, encode and decode GB/s
  (decode straight into a preallocated block).
- `kv_like_blocks(spec, num_blocks, seed)`: synthetic KV (Gaussian values in the spec's dtype) when no real
  KV is at hand; real KV (from an engine run) compresses differently, so pass it when available.
- `filesystem_of(path)`: "device fstype mountpoint" of a path, to say where a figure was measured.

Cold means: every DiskTier on the store closed (mapped pages cannot be evicted), `evict_file` on data.mdb,
then `resident_bytes == 0` checked before each timed read (docs/design.md "Cold page cache"). No function here
prints; results are plain dicts for the CLI's table and JSON.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import torch

from kvtier.tiers.codecs import Codec, get_codec
from kvtier.tiers.coldcache import cold_sequential_read_s, evict_file, resident_bytes, write_file
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.errors import StoreError
from kvtier.tiers.spec import KVSpec


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """The device, type and mount point of the file system holding `path`."""
    real, best = os.path.realpath(path), ("?", "?", "/")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    return " ".join(best)


def kv_like_blocks(spec: KVSpec, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """`num_blocks` blocks of Gaussian values (std 0.5) in the spec's dtype, as uint8 `[num_blocks, bytes]`."""
    gen = torch.Generator().manual_seed(seed)
    elems = spec.bytes_per_block // spec.itemsize
    out = torch.empty((num_blocks, spec.bytes_per_block), dtype=torch.uint8)
    for i in range(num_blocks):  # one block at a time: no float32 copy of the whole set
        out[i] = (torch.randn(elems, generator=gen) * 0.5).to(spec.torch_dtype).view(torch.uint8)
    return out


def _cold(path: str) -> None:
    left = evict_file(path)
    if left:
        raise StoreError(f"{path}: {left} bytes still in the page cache after eviction; the figure would not be cold")


def cold_restore_vs_sequential(directory: str | os.PathLike[str], spec: KVSpec, total_bytes: int = 512 << 20,
                               repeats: int = 5, *, codec: Codec | str = Codec.NONE, warmup: int = 1,
                               keep: bool = False) -> dict[str, Any]:
    """Cold disk restore of `total_bytes` of blocks vs a cold sequential read of as many bytes.

    Args:
        directory: where the store and the reference file go (the file system measured).
        spec: block geometry (e.g. llama-3-8b fp16 at 64 tokens: 8 MiB blocks).
        total_bytes: bytes restored per measurement (rounded down to whole blocks, at least one).
        repeats: interleaved pairs (restore, sequential read).
        warmup: pairs run first and not counted (the first read after writing 2 x `total_bytes` ran up to
            7x slower here while the disk was still busy).
        codec: the DiskTier's codec.
        keep: leave the files in place (they are deleted by default).

    Returns:
        a dict with `ratio` (median of per-pair sequential_s / restore_s), `ratio_min`, `ratio_max`,
        `restore_gbps` and `sequential_gbps` (medians), the per-repeat seconds, `bytes`, `num_blocks`,
        `block_bytes`, `resident_at_open_bytes` (the most of data.mdb in the page cache right after an
        open, before the timed read), `filesystem`.
    """
    num_blocks = max(1, total_bytes // spec.bytes_per_block)
    nbytes = num_blocks * spec.bytes_per_block
    work = tempfile.mkdtemp(prefix="kvtier-bench-", dir=directory)
    store, ref = os.path.join(work, "store"), os.path.join(work, "sequential.bin")
    keys = [i.to_bytes(16, "little") for i in range(num_blocks)]
    try:
        data = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (num_blocks, spec.bytes_per_block),
                                                                   dtype=np.uint8)) \
            if Codec.parse(codec) is Codec.NONE else kv_like_blocks(spec, num_blocks)
        settings = dict(codec=codec)
        with DiskTier(store, spec, nbytes, **settings) as tier:
            tier.put_many(keys, list(data))
            data_file = tier.data_file
        write_file(ref, nbytes)
        outs = torch.empty((num_blocks, spec.bytes_per_block), dtype=torch.uint8)
        restore_s, sequential_s, resident_at_open = [], [], 0
        for rep in range(warmup + repeats):
            _cold(data_file)
            tier = DiskTier(store, spec, nbytes, **settings)
            try:
                # opening reads LMDB's meta and root pages, with the kernel's read-around (a few MiB)
                resident_at_open = max(resident_at_open, resident_bytes(data_file))
                start = time.perf_counter()
                found = tier.get_many(keys, list(outs))
                restore = time.perf_counter() - start
            finally:
                tier.close()
            if not all(found):
                raise StoreError(f"cold restore benchmark: {found.count(False)} blocks missed")
            _cold(ref)
            sequential = cold_sequential_read_s(ref)
            if rep >= warmup:
                restore_s.append(restore)
                sequential_s.append(sequential)
        if not torch.equal(outs, data):
            raise StoreError("cold restore benchmark: restored bytes differ from the written ones")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    ratios = [s / r for r, s in zip(restore_s, sequential_s)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "restore_gbps": nbytes / statistics.median(restore_s) / 1e9,
            "sequential_gbps": nbytes / statistics.median(sequential_s) / 1e9,
            "restore_s": restore_s, "sequential_s": sequential_s, "bytes": nbytes, "num_blocks": num_blocks,
            "block_bytes": spec.bytes_per_block, "codec": Codec.parse(codec).label,
            "resident_at_open_bytes": resident_at_open, "filesystem": filesystem_of(directory)}


def codec_figures(spec: KVSpec, blocks: torch.Tensor | Sequence[torch.Tensor], repeats: int = 3,
                  level: int = 1, codecs: Sequence[Codec] = (Codec.ZSTD, Codec.ZSTD_SHUFFLE)) -> dict[str, Any]:
    """Compression ratio and speed of each codec on `blocks` (uint8 or typed, one block each).

    Returns:
        {codec name: {"ratio": raw/stored, "encode_gbps", "decode_gbps" (best of `repeats`, decoding straight
        into a preallocated block)}}.
    """
    flats = [b.reshape(-1).view(torch.uint8).numpy() for b in blocks]
    raw = sum(f.size for f in flats)
    out = np.empty(spec.bytes_per_block, dtype=np.uint8)
    figures: dict[str, Any] = {}
    for codec in codecs:
        c = get_codec(codec, level)
        enc, dec = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            stored = [c.encode(f, spec.itemsize) for f in flats]
            enc.append(time.perf_counter() - start)
            start = time.perf_counter()
            for s in stored:
                c.decode_into(s, out, spec.itemsize)
            dec.append(time.perf_counter() - start)
        if not np.array_equal(out, flats[-1]):
            raise AssertionError(f"{codec.name}: decoded bytes differ")
        figures[Codec.parse(codec).label] = {
            "ratio": raw / sum(len(s) for s in stored), "encode_gbps": raw / min(enc) / 1e9,
            "decode_gbps": raw / min(dec) / 1e9}
    return figures
