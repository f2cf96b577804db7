"""The disk tier against real LMDB stores in temp dirs: round trips, checks, capacity, durability."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest
import torch

from kvtier.tiers import diskenv
from kvtier.tiers.codecs import Codec
from kvtier.tiers.disk import DiskStats, DiskTier
from kvtier.tiers.diskformat import HEADER_BYTES, lmdb_key
from kvtier.tiers.diskread import read_value_at
from kvtier.tiers.errors import (CapacityError, ClosedError, ConfigError, SpecMismatchError, StoreError,
                                 StoreFormatError, StoreFullError)
from kvtier.tiers.spec import KVSpec

SPEC = KVSpec(model_id="test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=16,
              weights_revision="random-0")
BF16 = SPEC.with_(dtype="bfloat16", model_id="test-bf16")


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(i: int, spec: KVSpec = SPEC) -> torch.Tensor:
    """A deterministic block of KV-like values for key i."""
    gen = torch.Generator().manual_seed(i)
    return (torch.randn(spec.block_shape, generator=gen) * 0.5).to(spec.torch_dtype)


def empty(spec: KVSpec = SPEC) -> torch.Tensor:
    return torch.empty(spec.block_shape, dtype=spec.torch_dtype)


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def tier(store):
    t = DiskTier(store, SPEC, 64 * SPEC.bytes_per_block)
    yield t
    t.close()


def raw_env(path: str) -> lmdb.Environment:
    """The store opened with plain LMDB (the tier must be closed), to forge and damage values."""
    return lmdb.open(path, max_dbs=4, map_size=1 << 30)


def edit_value(path: str, spec: KVSpec, k: bytes, fn) -> None:
    env = raw_env(path)
    db = env.open_db(diskenv.BLOCKS_DB)
    with env.begin(write=True, db=db) as txn:
        value = bytearray(txn.get(lmdb_key(spec.fingerprint_bytes, k)))
        txn.put(lmdb_key(spec.fingerprint_bytes, k), bytes(fn(value)))
    env.close()


# -- round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("spec", [SPEC, BF16], ids=["fp32", "bf16"])
def test_round_trip_every_codec_byte_exact(store, codec, spec):
    with DiskTier(store, spec, 32 * spec.bytes_per_block, codec=codec) as t:
        blocks = [block(i, spec) for i in range(8)]
        t.put(key(0), blocks[0])
        t.put_async([key(i) for i in range(1, 8)], blocks[1:]).wait(30)
        outs = [empty(spec) for _ in range(9)]
        found = t.get_many([key(i) for i in range(9)], outs)
        assert found == [True] * 8 + [False]
        for b, out in zip(blocks, outs):
            assert torch.equal(out.view(torch.uint8), b.view(torch.uint8))
        stats = t.stats()
        assert (stats.hits, stats.misses, stats.num_blocks, stats.acknowledged_blocks) == (8, 1, 8, 8)
        if codec is Codec.NONE:
            assert stats.stored_bytes == 8 * spec.bytes_per_block
        else:
            assert stats.stored_bytes < 8 * spec.bytes_per_block  # Gaussian KV compresses a little


def test_reads_straight_into_preallocated_slot(tier):
    pool = torch.zeros((4, SPEC.bytes_per_block), dtype=torch.uint8)
    tier.put(key(1), block(1))
    ptr = pool[2].data_ptr()
    got = tier.get(key(1), pool[2])
    assert got is pool[2] or got.data_ptr() == ptr
    assert torch.equal(pool[2], block(1).view(torch.uint8).reshape(-1))
    assert not pool[1].any() and not pool[3].any()  # neighbouring slots untouched


def test_get_without_out_allocates(tier):
    tier.put(key(1), block(1))
    got = tier.get(key(1))
    assert torch.equal(got, block(1).view(torch.uint8).reshape(-1))
    assert tier.get(key(2)) is None


def test_overwrite_keeps_count_and_latest_bytes(tier):
    tier.put(key(1), block(1))
    tier.put(key(1), block(2))
    assert tier.num_used == 1
    assert torch.equal(tier.get(key(1), empty()), block(2))


def test_delete_and_contains(tier):
    tier.put_many([key(1), key(2)], [block(1), block(2)])
    assert tier.contains(key(1)) and tier.num_used == 2
    assert tier.delete(key(1)) is True
    assert tier.delete(key(1)) is False
    assert not tier.contains(key(1)) and tier.num_used == 1
    assert tier.stats().stored_bytes == SPEC.bytes_per_block


def test_listing_a_cold_store_reads_no_block(store):
    """keys(), contains() and num_used come from the index: after a restart nothing of the blocks is read."""
    from kvtier.tiers.coldcache import evict_file, resident_bytes

    spec = SPEC.with_(num_layers=256)  # 1 MiB blocks
    with DiskTier(store, spec, 64 * spec.bytes_per_block) as t:
        t.put_many([key(i) for i in range(64)], [torch.zeros(spec.block_shape)] * 64)
        data_file = t.data_file
    assert evict_file(data_file) == 0
    with DiskTier(store, spec, 64 * spec.bytes_per_block) as t:
        assert len(t.keys()) == 64 and t.contains(key(3)) and t.num_used == 64
        t.put(key(3), torch.ones(spec.block_shape))  # an overwrite checks the index, not the old value
        # what was read: LMDB's meta and B-tree pages with the kernel's read-around (8 MiB here), not the blocks
        assert resident_bytes(data_file) < 64 * spec.bytes_per_block / 2


def test_reopen_keeps_every_committed_block(store):
    t = DiskTier(store, SPEC, 64 * SPEC.bytes_per_block, codec="zstd-shuffle")
    t.put_async([key(i) for i in range(20)], [block(i) for i in range(20)])
    t.close()  # close commits what was queued
    t = DiskTier(store, SPEC, 64 * SPEC.bytes_per_block)
    assert sorted(t.keys()) == sorted(key(i) for i in range(20))
    assert t.num_used == 20
    for i in range(20):  # read by the header's codec, whatever the tier writes with
        assert torch.equal(t.get(key(i), empty()), block(i))
    t.close()
    t.close()  # idempotent


def test_two_specs_in_one_store_do_not_see_each_other(store):
    other = SPEC.with_(model_id="other")
    a = DiskTier(store, SPEC, 16 * SPEC.bytes_per_block)
    b = DiskTier(store, other, 16 * SPEC.bytes_per_block)  # the same path opened twice in one process
    a.put(key(1), block(1))
    b.put(key(1), block(100))
    b.put(key(2), block(2))
    assert a.keys() == [key(1)] and sorted(b.keys()) == [key(1), key(2)]
    assert torch.equal(a.get(key(1), empty()), block(1))
    assert torch.equal(b.get(key(1), empty()), block(100))
    assert a.get(key(2), empty()) is None
    a.close()
    assert torch.equal(b.get(key(2), empty()), block(2))  # the shared env stays open for b
    b.close()


def test_data_file_and_reopen(tier):
    tier.put(key(1), block(1))
    assert os.path.basename(tier.data_file) == "data.mdb" and os.path.isfile(tier.data_file)
    assert DiskTier.data_file_of(tier.path) == tier.data_file
    again = tier.reopen()
    with pytest.raises(ClosedError, match="closed"):
        tier.get(key(1), empty())
    assert torch.equal(again.get(key(1), empty()), block(1))
    again.close()


# -- never wrong bytes ----------------------------------------------------------------------------------

def _damaged(store, fn, codec=Codec.NONE):
    """Stores blocks 1 and 2, damages block 1's value with `fn`, and reopens."""
    t = DiskTier(store, SPEC, 16 * SPEC.bytes_per_block, codec=codec)
    t.put_many([key(1), key(2)], [block(1), block(2)])
    t.close()
    edit_value(store, SPEC, key(1), fn)
    return DiskTier(store, SPEC, 16 * SPEC.bytes_per_block)


def flip(offset):
    def fn(value):
        value[offset] ^= 0x40
        return value
    return fn


@pytest.mark.parametrize("codec", list(Codec))
def test_flipped_payload_byte_is_a_counted_removed_miss(store, codec):
    t = _damaged(store, flip(HEADER_BYTES + 100), codec)
    t.close()
    t = DiskTier(store, SPEC, 16 * SPEC.bytes_per_block)
    assert t.get(key(1), empty()) is None
    stats = t.stats()
    assert (stats.corrupt, stats.foreign, stats.misses, stats.num_blocks) == (1, 0, 1, 1)
    assert not t.contains(key(1))  # removed
    assert torch.equal(t.get(key(2), empty()), block(2))  # the neighbour is intact
    t.close()


@pytest.mark.parametrize("damage", [
    pytest.param(lambda v: v[:HEADER_BYTES + 1000], id="truncated"),
    pytest.param(lambda v: v[:20], id="shorter-than-header"),
    pytest.param(flip(0), id="magic"),
    pytest.param(flip(4), id="version"),
    pytest.param(flip(45), id="stored-length"),
    pytest.param(flip(60), id="checksum"),
])
def test_damaged_value_is_a_corrupt_miss(store, damage):
    t = _damaged(store, damage)
    assert t.get_many([key(1), key(2)], [empty(), empty()]) == [False, True]
    assert t.stats().corrupt == 1 and t.num_used == 1
    t.close()


def test_value_of_another_key_is_a_foreign_miss(store):
    t = DiskTier(store, SPEC, 16 * SPEC.bytes_per_block)
    t.put_many([key(1), key(2)], [block(1), block(2)])
    t.close()
    env = raw_env(store)
    db = env.open_db(diskenv.BLOCKS_DB)
    with env.begin(write=True, db=db) as txn:  # block 2's (valid) value under key 1
        txn.put(lmdb_key(SPEC.fingerprint_bytes, key(1)), txn.get(lmdb_key(SPEC.fingerprint_bytes, key(2))))
    env.close()
    t = DiskTier(store, SPEC, 16 * SPEC.bytes_per_block)
    assert t.get(key(1), empty()) is None
    assert (t.stats().foreign, t.stats().corrupt) == (1, 0)
    assert not t.contains(key(1))
    t.close()


def test_value_of_another_model_is_a_foreign_miss(store):
    other = SPEC.with_(weights_revision="random-1")  # same geometry, other weights
    t = DiskTier(store, other, 16 * SPEC.bytes_per_block)
    t.put(key(1), block(1))
    t.close()
    env = raw_env(store)
    db = env.open_db(diskenv.BLOCKS_DB)
    with env.begin(write=True, db=db) as txn:  # the other model's value forged under our key
        txn.put(lmdb_key(SPEC.fingerprint_bytes, key(1)), txn.get(lmdb_key(other.fingerprint_bytes, key(1))))
    env.close()
    t = DiskTier(store, SPEC, 16 * SPEC.bytes_per_block)
    assert t.get(key(1), empty()) is None
    assert t.stats().foreign == 1 and t.num_used == 0
    t.close()


# -- bad input and exhaustion ---------------------------------------------------------------------------

def test_incompatible_format_version_refuses_to_open(store):
    DiskTier(store, SPEC, SPEC.bytes_per_block).close()
    env = raw_env(store)
    meta = env.open_db(diskenv.META_DB)
    with env.begin(write=True, db=meta) as txn:
        txn.put(diskenv.VERSION_KEY, b"99")
    env.close()
    with pytest.raises(StoreFormatError, match=r"format version b'99'.*version 1"):
        DiskTier(store, SPEC, SPEC.bytes_per_block)
    # the failed open left nothing behind: the store opens again once its version is right
    env = raw_env(store)
    with env.begin(write=True, db=env.open_db(diskenv.META_DB)) as txn:
        txn.put(diskenv.VERSION_KEY, b"1")
    env.close()
    DiskTier(store, SPEC, SPEC.bytes_per_block).close()


def test_capacity_below_one_block(store):
    with pytest.raises(ConfigError, match="smaller than one block"):
        DiskTier(store, SPEC, SPEC.bytes_per_block - 1)


def test_unwritable_path_names_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    with pytest.raises(StoreError, match="a-file"):
        DiskTier(blocker / "store", SPEC, SPEC.bytes_per_block)


@pytest.mark.parametrize("kwargs, match", [
    ({"codec": "lz4"}, "codec: 'lz4'"),
    ({"batch_max_blocks": 0}, "batch_max_blocks"),
    ({"zstd_level": 99}, "zstd_level"),
    ({"map_size": "1MiB", "max_map_size": "512KiB"}, "max_map_size"),
])
def test_bad_arguments(store, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DiskTier(store, SPEC, SPEC.bytes_per_block, **kwargs)


def test_wrong_block_size(tier):
    with pytest.raises(SpecMismatchError, match="expected 8192 bytes"):
        tier.put(key(1), torch.zeros(100))
    with pytest.raises(SpecMismatchError, match="expected 8192 bytes"):
        tier.get(key(1), torch.zeros(100))


def test_keys_must_have_16_bytes(tier):
    with pytest.raises(ConfigError, match="block key: expected 16 bytes, got 3"):
        tier.put(b"abc", block(1))
    with pytest.raises(ConfigError, match="block key: expected 16 bytes, got 3"):
        tier.put_async([b"abc"], [block(1)])
    with pytest.raises(ConfigError, match="block key: expected 16 bytes"):
        tier.get(b"abc", empty())


def test_put_beyond_capacity(store):
    with DiskTier(store, SPEC, 3 * SPEC.bytes_per_block) as t:
        t.put_many([key(i) for i in range(3)], [block(i) for i in range(3)])
        with pytest.raises(CapacityError, match="full"):
            t.put(key(3), block(3))
        t.put(key(0), block(9))  # overwriting a stored key needs no room
        handle = t.put_async([key(4), key(1)], [block(4), block(1)]).wait(30)
        assert handle.failed == (key(4),) and handle.error is None
        assert t.num_used == 3
        t.delete(key(2))
        t.put(key(3), block(3))  # room again after a delete


def test_map_full_without_growth_is_a_clear_error(store):
    t = DiskTier(store, SPEC, 1000 * SPEC.bytes_per_block, map_size="1MiB", max_map_size="1MiB")
    with pytest.raises(StoreFullError, match="map full"):
        for i in range(200):
            t.put(key(i), block(i))
    handle = t.put_async([key(1000 + i) for i in range(200)], [block(i) for i in range(200)])
    with pytest.raises(Exception, match="map full"):
        handle.wait(30)
    assert isinstance(handle.error, StoreFullError)
    stored = t.num_used
    assert stored > 0 and len(t.keys()) == stored  # what was committed before stays readable
    assert torch.equal(t.get(key(0), empty()), block(0))
    t.delete(key(0))  # the store still works
    t.close()


def test_map_grows_when_allowed(store):
    with DiskTier(store, SPEC, 1000 * SPEC.bytes_per_block, map_size="1MiB", max_map_size="64MiB") as t:
        t.put_many([key(i) for i in range(300)], [block(i) for i in range(300)])
        assert t.num_used == 300 and t.describe()["map_size"] > 1 << 20
        assert torch.equal(t.get(key(299), empty()), block(299))


def test_readonly_tier_reads_but_refuses_writes(store):
    with DiskTier(store, SPEC, 4 * SPEC.bytes_per_block) as t:
        t.put(key(1), block(1))
    with DiskTier(store, SPEC, 4 * SPEC.bytes_per_block, readonly=True) as t:
        assert torch.equal(t.get(key(1), empty()), block(1))
        with pytest.raises(StoreError, match="read-only"):
            t.put(key(2), block(2))
    with pytest.raises(StoreError, match="missing-store"):
        DiskTier(os.path.join(store, "missing-store"), SPEC, SPEC.bytes_per_block, readonly=True)


def test_closed_tier_refuses_use(store):
    t = DiskTier(store, SPEC, 4 * SPEC.bytes_per_block)
    t.close()
    with pytest.raises(ClosedError):
        t.put_async([key(1)], [block(1)])
    with pytest.raises(ClosedError):
        t.keys()


# -- acknowledged means durable -------------------------------------------------------------------------

_READER = textwrap.dedent("""
    import lmdb, sys
    env = lmdb.open(sys.argv[1], max_dbs=4, readonly=True, lock=True)
    db = env.open_db(sys.argv[2].encode(), create=False)
    with env.begin(db=db) as txn:
        print(txn.get(bytes.fromhex(sys.argv[3])) is not None)
""")


def test_put_async_completes_only_after_commit(store):
    seen_in_callback = []
    with DiskTier(store, SPEC, 64 * SPEC.bytes_per_block, batch_max_blocks=4) as t:
        def on_commit(keys):  # a fresh read txn sees every acknowledged block
            seen_in_callback.append(all(t.contains(k) for k in keys))

        handle = t.put_async([key(i) for i in range(10)], [block(i) for i in range(10)], on_commit=on_commit)
        handle.wait(30)
        assert seen_in_callback == [True] and handle.failed == ()
        assert t.stats().acknowledged_blocks == 10
        # another process, with its own read transaction, finds the last block of the last batch
        lk = lmdb_key(SPEC.fingerprint_bytes, key(9)).hex()
        out = subprocess.run([sys.executable, "-c", _READER, store, diskenv.BLOCKS_DB.decode(), lk],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "True", out.stderr


def test_flush_waits_for_queued_saves(tier):
    handles = [tier.put_async([key(i)], [block(i)]) for i in range(12)]
    tier.flush(30)
    assert all(h.done() for h in handles)
    assert tier.num_used == 12 and tier.stats() == DiskStats(0, 0, 0, 0, 12, tier.stats().bytes_read,
                                                             tier.stats().bytes_written,
                                                             12 * SPEC.bytes_per_block, 12)


def test_values_are_located_in_the_data_file(store):
    """The read path's offsets: `locate_many` walks the B-tree to where each value lies in data.mdb, for a
    tree of several levels, without reading any value."""
    n = 300  # several leaf pages and a branch level (~60 nodes of 32-byte keys per 4 KiB leaf)
    tier = DiskTier(store, SPEC, n * SPEC.bytes_per_block)
    tier.put_many([key(i) for i in range(n)], [block(i % 7) for i in range(n)])
    shared = diskenv.acquire(tier.path, 1 << 20, 1 << 20, readonly=True)  # shares the tier's open env
    try:
        with shared.txn() as txn:
            lks = [lmdb_key(SPEC.fingerprint_bytes, key(i)) for i in range(n)] + [lmdb_key(SPEC.fingerprint_bytes,
                                                                                         key(n + 5))]
            found = shared.locate_many(txn, lks)
            assert found[-1] is None  # absent
            for i in (0, 1, 57, 150, n - 1):
                offset, length = found[i]
                assert length == HEADER_BYTES + SPEC.bytes_per_block
                view = txn.get(lks[i], db=shared.blocks_db)
                assert os.pread(shared.fd, length, offset) == bytes(view)
                assert shared._mapped(offset, length) == np.frombuffer(view, dtype=np.uint8).ctypes.data
            offset, length = found[1]
            out = np.empty(SPEC.bytes_per_block, dtype=np.uint8)  # the pread path reads and checks it there
            assert read_value_at(shared.fd, offset, length, SPEC.fingerprint_bytes, key(1), out, 4) is None
            assert np.array_equal(out, block(1).view(torch.uint8).reshape(-1).numpy())
            assert read_value_at(shared.fd, offset, length, SPEC.fingerprint_bytes, key(2), out, 4) == "foreign"
            assert read_value_at(shared.fd, offset + 1, length, SPEC.fingerprint_bytes, key(1), out, 4) == "corrupt"
            assert shared._mapped(os.fstat(shared.fd).st_size + (1 << 40), 1) is None  # outside the map
    finally:
        shared.release()
    assert torch.equal(tier.get(key(1), empty()), block(1))  # the tier's env stays open
    tier.close()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs, where mounting is allowed (root with CAP_SYS_ADMIN); skipped elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_file_system_full_is_a_clear_error(small_fs):
    t = DiskTier(small_fs / "store", SPEC, 1000 * SPEC.bytes_per_block, map_size="64MiB")
    with pytest.raises(StoreFullError, match="file system full"):
        for i in range(1000):
            t.put(key(i), block(i))
    handle = t.put_async([key(5000)], [block(5000)])
    with pytest.raises(Exception, match="file system full"):
        handle.wait(30)
    assert handle.failed == (key(5000),)
    stored = t.num_used
    assert stored > 0 and torch.equal(t.get(key(0), empty()), block(0))  # committed blocks stay readable
    assert t.delete(key(0)) and t.num_used == stored - 1  # and the store still works
    t.close()


def test_readers_and_background_writer_run_together(tier):
    """Reader threads read each batch of acknowledged blocks while the writer commits more: never wrong bytes."""
    import threading

    acked: list[bytes] = []
    cond = threading.Condition()
    errors: list[str] = []
    stop = threading.Event()

    def on_commit(keys):
        with cond:
            acked.extend(keys)
            cond.notify_all()

    def reader():
        out, seen = empty(), 0
        while True:
            with cond:
                cond.wait_for(lambda: len(acked) > seen or stop.is_set(), timeout=30)
                if stop.is_set():
                    return
                sample, seen = acked[seen:], len(acked)
            for k in sample:  # read while the writer is committing the next batches
                if tier.get(k, out) is None or not torch.equal(out, block(int.from_bytes(k, "little"))):
                    errors.append(k.hex())

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        handles = [tier.put_async([key(i), key(i + 1)], [block(i), block(i + 1)], on_commit=on_commit)
                   for i in range(0, 40, 2)]
        for h in handles:
            h.wait(30)
    finally:
        with cond:
            stop.set()
            cond.notify_all()
        for t in threads:
            t.join(30)
    assert not errors and len(acked) == 40 and tier.num_used == 40
