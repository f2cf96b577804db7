"""The disk tier against real LMDB stores in temp dirs: round trips, checks, capacity, durability."""

from __future__ import annotations

import os

import pytest
import torch

from kvtier.tiers.disk import env as diskenv
from kvtier.tiers.codecs import Codec
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.disk.format import HEADER_BYTES, lmdb_key
from kvtier.tiers.errors import (ClosedError, StoreFormatError)

from diskutil import BF16, SPEC, block, edit_value, empty, key, raw_env


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


