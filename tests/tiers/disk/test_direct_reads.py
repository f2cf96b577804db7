"""Disk reads straight into memory runs (scattered over an engine's KV), loads through the host slots, the
cold-value page handling and the work-sharing copier: real LMDB stores, real tensors, real threads."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from diskutil import kv_runs
from kvtier.scheduler.engines.hf.kv import HFKVBuffer
from kvtier.tiers import coldcache
from kvtier.tiers.codecs import Codec
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.errors import SpecMismatchError
from kvtier.tiers.pool import HostTier
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName
from kvtier.tiers.copies import ParallelCopier
from kvtier.tiers.transfer import Transferer

import lmdb

from kvtier.tiers.disk import env as diskenv
from kvtier.tiers.disk.format import HEADER_BYTES, lmdb_key

SPEC = KVSpec(model_id="test-direct", num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32",
              block_tokens=16, weights_revision="random-0", kv_factor=2)


def key(i: int) -> bytes:
    return (1000 + i).to_bytes(16, "little")


def block(i: int) -> torch.Tensor:
    return torch.randn(SPEC.block_shape, generator=torch.Generator().manual_seed(i))


def damage(path: str, k: bytes, offset: int) -> None:
    """Flips one byte of a stored value through plain LMDB (the tier must be closed)."""
    env = lmdb.open(path, max_dbs=4, map_size=1 << 30)
    db = env.open_db(diskenv.BLOCKS_DB)
    with env.begin(write=True, db=db) as txn:
        value = bytearray(txn.get(lmdb_key(SPEC.fingerprint_bytes, k)))
        value[offset] ^= 0x40
        txn.put(lmdb_key(SPEC.fingerprint_bytes, k), bytes(value))
    env.close()


def engine_kv(num_blocks: int) -> HFKVBuffer:
    buffer = HFKVBuffer.allocate(SPEC, num_blocks * SPEC.block_tokens)
    for t in buffer.keys + buffer.values:
        t.fill_(-7.0)
    return buffer


def as_block(buffer: HFKVBuffer, b: int) -> torch.Tensor:
    """Engine block b in the docs/design.md layout, read back with the adapter's own copy."""
    out = torch.empty((1, *SPEC.block_shape))
    buffer.read_blocks([b], out, (0, SPEC.num_layers))
    return out[0]


@pytest.mark.parametrize("codec", [Codec.NONE, Codec.ZSTD])
def test_get_many_into_engine_memory_runs_is_byte_exact(tmp_path, codec):
    with DiskTier(tmp_path / "s", SPEC, 16 * SPEC.bytes_per_block, codec=codec) as disk:
        disk.put_many([key(i) for i in range(4)], [block(i) for i in range(4)])
        buffer = engine_kv(4)
        order = [2, 0, 3]  # engine blocks in another order than the keys
        found = disk.get_many([key(0), key(1), key(2), key(9)], [kv_runs(buffer, b) for b in order + [1]])
        assert found == [True, True, True, False]
        for i, b in enumerate(order):
            assert torch.equal(as_block(buffer, b), block(i))


def test_memory_runs_of_the_wrong_size_are_refused(tmp_path):
    with DiskTier(tmp_path / "s", SPEC, 4 * SPEC.bytes_per_block) as disk:
        disk.put(key(0), block(0))
        short = [memoryview(bytearray(SPEC.bytes_per_block - 4))]
        with pytest.raises(SpecMismatchError, match="memory runs"):
            disk.get_many([key(0)], [short])
        with pytest.raises(SpecMismatchError):
            disk.get_many([key(0)], [[memoryview(bytes(SPEC.bytes_per_block))]])  # read-only


def test_corrupt_value_read_into_runs_is_a_counted_miss(tmp_path):
    path = str(tmp_path / "s")
    with DiskTier(path, SPEC, 8 * SPEC.bytes_per_block) as disk:
        disk.put_many([key(0), key(1)], [block(0), block(1)])
    damage(path, key(0), HEADER_BYTES + 100)
    with DiskTier(path, SPEC, 8 * SPEC.bytes_per_block) as disk:
        buffer = engine_kv(2)
        assert disk.get_many([key(0), key(1)], [kv_runs(buffer, 0), kv_runs(buffer, 1)]) == [False, True]
        assert disk.stats().corrupt == 1
        assert torch.equal(as_block(buffer, 1), block(1))


def test_load_from_disk_fills_the_booked_host_slots_and_the_engine_kv(tmp_path):
    n = 5
    disk = DiskTier(tmp_path / "s", SPEC, 16 * SPEC.bytes_per_block)
    host = HostTier(SPEC, 8 * SPEC.bytes_per_block)
    disk.put_many([key(i) for i in range(n)], [block(i) for i in range(n)])
    transfer = Transferer({TierName.HOST: host, TierName.DISK: disk})
    try:
        buffer = engine_kv(n)
        host_slots = [6, 2, 3, 4, 0]
        handle = transfer.load([key(i) for i in range(n)], [TierName.DISK] * n, host_slots, buffer, list(range(n)))
        handle.wait(30)
        assert handle.failed == ()
        transfer.drain()
        for i in range(n):
            assert torch.equal(as_block(buffer, i), block(i))
            assert torch.equal(host.pool.blocks(host_slots[i], 1)[0], block(i))  # the host copy exists
    finally:
        transfer.close()
        disk.close()


def test_load_with_a_corrupt_disk_block_delivers_the_prefix_only(tmp_path):
    path = str(tmp_path / "s")
    with DiskTier(path, SPEC, 8 * SPEC.bytes_per_block) as disk:
        disk.put_many([key(i) for i in range(3)], [block(i) for i in range(3)])
    damage(path, key(1), HEADER_BYTES + 5)
    disk = DiskTier(path, SPEC, 8 * SPEC.bytes_per_block)
    host = HostTier(SPEC, 4 * SPEC.bytes_per_block)
    transfer = Transferer({TierName.HOST: host, TierName.DISK: disk})
    try:
        buffer = engine_kv(3)
        handle = transfer.load([key(i) for i in range(3)], [TierName.DISK] * 3, [0, 1, 2], buffer, [0, 1, 2])
        handle.wait(30)
        assert set(handle.failed) == {key(1), key(2)}
        assert torch.equal(as_block(buffer, 0), block(0))
    finally:
        transfer.close()
        disk.close()


def test_locating_values_reads_no_page_of_them(tmp_path):
    """A cold read locates its values through the B-tree alone: a value page in the page cache ahead of the
    read would stop the kernel's readahead (see `disk.env`)."""
    spec = SPEC.with_(num_layers=32, model_id="test-big")  # 256 KiB blocks: many pages each
    blocks = [torch.randn(spec.block_shape, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    path = tmp_path / "s"
    with DiskTier(path, spec, 16 * spec.bytes_per_block) as disk:
        disk.put_many([key(i) for i in range(6)], blocks)
    data = DiskTier.data_file_of(path)
    if coldcache.evict_file(data):
        pytest.skip("cannot drop this file from the page cache here")
    with DiskTier(path, spec, 16 * spec.bytes_per_block) as disk:
        env = disk._env
        before = coldcache.resident_bytes(data)  # what LMDB read at open
        with env.txn() as txn:
            located = env.locate_many(txn, [lmdb_key(disk.spec.fingerprint_bytes, key(i)) for i in range(6)] + [lmdb_key(disk.spec.fingerprint_bytes, key(99))])
        assert all(isinstance(where, tuple) for where in located[:6]) and located[6] is None
        assert coldcache.resident_bytes(data) - before <= 4 * env.page_size  # B-tree pages at most
        outs = [torch.empty(spec.block_shape) for _ in range(6)]
        assert disk.get_many([key(i) for i in range(6)], outs) == [True] * 6
        assert all(torch.equal(o, b) for o, b in zip(outs, blocks))


def test_parallel_copier_moves_scattered_runs_exactly():
    rng = random.Random(1)
    src = np.frombuffer(np.random.default_rng(0).bytes(24 << 20), dtype=np.uint8).copy()
    dst = np.zeros_like(src)
    sizes = [rng.randrange(1, 3 << 20) for _ in range(12)]
    offsets, pos = [], 0
    for size in sizes:
        offsets.append(pos)
        pos += size
    order = list(range(len(sizes)))
    rng.shuffle(order)
    dst_offsets, pos = {}, 0
    for i in order:
        dst_offsets[i] = pos
        pos += sizes[i]
    chunks = [(dst.ctypes.data + dst_offsets[i], src.ctypes.data + offsets[i], sizes[i]) for i in range(len(sizes))]
    copier = ParallelCopier(3)
    try:
        copier.copy(chunks)
    finally:
        copier.close()
    for i in range(len(sizes)):
        assert np.array_equal(dst[dst_offsets[i]:dst_offsets[i] + sizes[i]], src[offsets[i]:offsets[i] + sizes[i]])


def test_a_page_number_past_the_file_is_never_touched(tmp_path):
    """A damaged tree naming a page past data.mdb's end is unlocatable, never a read of unbacked map memory."""
    with DiskTier(tmp_path / "s", SPEC, 4 * SPEC.bytes_per_block) as disk:
        disk.put(key(0), block(0))
        env = disk._env
        pages = os.fstat(env.fd).st_size // env.page_size
        assert env._page_nodes(pages + 10) is None
        assert env._find(pages + 10, 3, lmdb_key(disk.spec.fingerprint_bytes, key(0)), {}) == diskenv.UNLOCATED
