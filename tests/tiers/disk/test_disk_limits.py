"""The disk tier at its limits: bad arguments, capacity, map and file system full, read-only and closed
stores, background writes, concurrent readers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kvtier.tiers.disk import env as diskenv
from kvtier.tiers.disk.store import DiskStats, DiskTier
from kvtier.tiers.disk.format import HEADER_BYTES, lmdb_key
from kvtier.tiers.disk.read import read_value_at
from kvtier.tiers.errors import (CapacityError, ClosedError, ConfigError, SpecMismatchError, StoreError,
                                 StoreFullError)

from diskutil import SPEC, block, empty, key


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
