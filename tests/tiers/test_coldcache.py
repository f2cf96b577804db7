"""Cold-cache helpers: eviction proven by mincore, the sequential-read limit, open stores refused."""

from __future__ import annotations

import os

import pytest
import torch

from kvtier.tiers.coldcache import cold_sequential_read_s, evict_file, resident_bytes, write_file
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.errors import StoreError
from kvtier.tiers.spec import KVSpec

SPEC = KVSpec(model_id="test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=16,
              weights_revision="random-0")


def test_evict_then_read(tmp_path):
    path = tmp_path / "file"
    write_file(path, 3 << 20)
    assert os.path.getsize(path) == 3 << 20
    assert evict_file(path) == 0  # fadvise(DONTNEED) after a sync drops an unmapped file's pages
    assert resident_bytes(path) == 0
    assert cold_sequential_read_s(path, block_size=1 << 20) > 0
    assert resident_bytes(path) == 3 << 20  # the read brought every page in


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    write_file(path, 0)
    assert resident_bytes(path) == 0 and evict_file(path) == 0


def test_refuses_a_store_still_open(tmp_path):
    tier = DiskTier(tmp_path / "store", SPEC, 4 * SPEC.bytes_per_block)
    tier.put(b"k" * 16, torch.ones(SPEC.block_shape))
    with pytest.raises(StoreError, match="still open"):
        evict_file(tier.data_file)
    data_file = tier.data_file
    tier.close()  # closing unmaps it: now it can be evicted
    assert evict_file(data_file) == 0
    tier = DiskTier(tmp_path / "store", SPEC, 4 * SPEC.bytes_per_block)
    assert tier.get(b"k" * 16) is not None
    tier.close()


def test_cold_restore_benchmark_runs_small(tmp_path):
    from kvtier.tiers.disk.bench import codec_figures, cold_restore_vs_sequential, kv_like_blocks

    spec = SPEC.with_(dtype="bfloat16", num_layers=8)  # 16 KiB blocks
    figures = cold_restore_vs_sequential(tmp_path, spec, total_bytes=1 << 20, repeats=2, warmup=0)
    assert figures["num_blocks"] == 64 and figures["bytes"] == 1 << 20 and len(figures["restore_s"]) == 2
    assert figures["ratio"] > 0 and figures["ratio_min"] <= figures["ratio"] <= figures["ratio_max"]
    assert figures["filesystem"].split()[0]
    assert list(tmp_path.iterdir()) == []  # its files are removed
    codecs = codec_figures(spec, kv_like_blocks(spec, 4), repeats=1)
    assert set(codecs) == {"zstd", "zstd-shuffle"} and all(f["ratio"] > 1 for f in codecs.values())
