"""A restore read by a few reader threads, each one contiguous range of data.mdb (`disk.readers`): the same
bytes as one thread, bad values still clean misses, landing callbacks on the caller's thread, concurrent
restores, and a pool whose threads end with the tier. Real LMDB stores in temp dirs, real threads."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from diskutil import SPEC, block, edit_value, empty, key, kv_runs
from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.engines.hf.kv import HFKVBuffer
from kvtier.tiers.codecs import Codec
from kvtier.tiers.disk.format import HEADER_BYTES
from kvtier.tiers.disk import readers
from kvtier.tiers.disk.readers import ReaderPool, split_ranges
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.errors import ClosedError, ConfigError
from kvtier.tiers.pool import HostTier
from kvtier.tiers.tier import TierName
from kvtier.tiers.transfer import Transferer

N = 24
BPB = SPEC.bytes_per_block


def reader_threads(prefix: str = "kvtier-disk-read") -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.fixture
def filled(store):
    """A store holding blocks 0..N-1 (written, then closed)."""
    with DiskTier(store, SPEC, 4 * N * BPB) as disk:
        disk.put_many([key(i) for i in range(N)], [block(i) for i in range(N)])
    return store


def read_all(store: str, threads: int, keys: list[bytes], codec: Codec = Codec.NONE) -> tuple[list[bool], list]:
    with DiskTier(store, SPEC, 4 * N * BPB, codec=codec, read_threads=threads, read_split_bytes=BPB) as disk:
        outs = [empty() for _ in keys]
        return disk.get_many(keys, outs), outs


# -- splitting -------------------------------------------------------------------------------------------

def test_ranges_are_contiguous_balanced_and_cover_the_run():
    located = [(i * 100, 100 if i % 3 else 300, i) for i in range(20)]
    runs = split_ranges(located, 4, min_part_bytes=1)
    assert len(runs) == 4
    assert [x for run in runs for x in run] == located  # contiguous, in file order, nothing left out
    sizes = [sum(n for _, n, _ in run) for run in runs]
    assert all(abs(size - sum(sizes) / 4) <= 300 for size in sizes)  # within one value of an equal share


def test_small_reads_stay_one_range():
    located = [(i * 100, 100, i) for i in range(8)]
    assert split_ranges(located, 4, min_part_bytes=400) == [located[:4], located[4:]]
    assert split_ranges(located, 4, min_part_bytes=10_000) == [located]
    assert split_ranges(located[:1], 4, min_part_bytes=1) == [located[:1]]
    assert split_ranges([], 4) == []


def test_bad_thread_counts_are_refused(store):
    with pytest.raises(ConfigError, match="num_parts: expected >= 1, got 0"):
        split_ranges([(0, 1, 0)], 0)
    with pytest.raises(ConfigError, match="read_threads: expected a positive int, got 0"):
        DiskTier(store, SPEC, 4 * BPB, read_threads=0)
    with pytest.raises(ConfigError, match="read_threads: expected a positive int, got 2.5"):
        ReaderPool(2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="disk_read_threads: expected a positive int, got 0"):
        OffloadConfig(disk_read_threads=0)


# -- the same bytes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [Codec.NONE, Codec.ZSTD_SHUFFLE])
def test_four_readers_deliver_the_bytes_one_reader_does(store, codec):
    with DiskTier(store, SPEC, 4 * N * BPB, codec=codec) as disk:
        disk.put_many([key(i) for i in range(N)], [block(i) for i in range(N)])
    keys = [key(i) for i in (5, 0, 23, 7, 99, 12, 3)] + [key(i) for i in range(13, 20)]  # any order, one absent
    one_found, one = read_all(store, 1, keys, codec)
    four_found, four = read_all(store, 4, keys, codec)
    assert one_found == four_found == [k != key(99) for k in keys]
    for k, a, b, ok in zip(keys, one, four, four_found):
        if ok:
            assert a.numpy().tobytes() == b.numpy().tobytes() == block(int.from_bytes(k, "little")).numpy().tobytes()


def test_readers_fill_engine_memory_runs_exactly(filled):
    buffer = HFKVBuffer.allocate(SPEC, N * SPEC.block_tokens)
    engine_blocks = list(reversed(range(N)))  # the engine's blocks in another order than the file's
    with DiskTier(filled, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        found = disk.get_many([key(i) for i in range(N)], [kv_runs(buffer, b) for b in engine_blocks])
    assert found == [True] * N
    out = torch.empty((1, *SPEC.block_shape))
    for i, b in enumerate(engine_blocks):
        buffer.read_blocks([b], out, (0, SPEC.num_layers))
        assert torch.equal(out[0], block(i))


# -- bad values ------------------------------------------------------------------------------------------

def test_a_corrupt_value_in_a_readers_range_is_a_counted_miss(filled):
    def flip(value: bytearray) -> bytearray:
        value[HEADER_BYTES + 9] ^= 0x10  # one payload bit: the checksum must catch it
        return value

    edit_value(filled, SPEC, key(17), flip)
    with DiskTier(filled, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        outs = [empty() for _ in range(N)]
        found = disk.get_many([key(i) for i in range(N)], outs)
        assert found == [i != 17 for i in range(N)]
        assert all(torch.equal(outs[i], block(i)) for i in range(N) if i != 17)
        assert disk.stats().corrupt == 1 and disk.stats().hits == N - 1
        assert not disk.contains(key(17))  # removed, so the next restore does not trip on it


# -- callbacks, concurrency, lifetime ----------------------------------------------------------------------

def test_landed_batches_come_on_the_callers_thread_once_per_block(filled):
    calls: list[tuple[int, list[int]]] = []
    with DiskTier(filled, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        found = disk.get_many([key(i) for i in range(N)], [empty() for _ in range(N)],
                              on_landed=lambda batch: calls.append((threading.get_ident(), list(batch))),
                              batch_blocks=3)
    assert found == [True] * N
    assert {ident for ident, _ in calls} == {threading.get_ident()}
    landed = [i for _, batch in calls for i in batch]
    assert sorted(landed) == list(range(N))  # each block once
    assert all(len(batch) <= 3 for _, batch in calls)


def test_concurrent_restores_share_the_pool_and_stay_exact(filled):
    with DiskTier(filled, SPEC, 4 * N * BPB, read_threads=3, read_split_bytes=BPB) as disk:
        errors: list[BaseException] = []

        def restore(seed: int) -> None:
            try:
                keys = [key((seed * 7 + j) % N) for j in range(N)]
                outs = [empty() for _ in keys]
                for _ in range(5):
                    assert disk.get_many(keys, outs) == [True] * N
                    for k, o in zip(keys, outs):
                        assert torch.equal(o, block(int.from_bytes(k, "little")))
            except BaseException as err:  # noqa: BLE001 - reported by the test thread
                errors.append(err)

        workers = [threading.Thread(target=restore, args=(s,)) for s in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not any(w.is_alive() for w in workers)
        assert errors == []
        assert len(reader_threads()) <= 3  # bounded, however many restores at once


def test_reader_threads_end_with_the_tier(filled):
    before = set(reader_threads())
    disk = DiskTier(filled, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB)
    assert disk.get_many([key(i) for i in range(N)], [empty() for _ in range(N)]) == [True] * N
    started = set(reader_threads()) - before
    assert 1 <= len(started) <= 4
    disk.close()
    assert not any(t.is_alive() for t in started)
    with pytest.raises(ClosedError):
        disk.get_many([key(0)], [empty()])


def test_a_failing_reader_stops_the_others_and_raises_after_they_stop(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * 100))
    located = [(i * 100, 100, i) for i in range(64)]
    reported: list[int] = []

    def read_one(fd: int, offset: int, length: int, i: int, part: int) -> str | None:
        if i == 40:
            raise OSError(5, "Input/output error")
        return None if len(os.pread(fd, length, offset)) == length else "short"

    pool = ReaderPool(4, min_part_bytes=1)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            pool.read(str(path), fd, located, read_one, lambda i, reason, n: reported.append(i))
        assert 40 not in reported and len(set(reported)) == len(reported)
        pool.read(str(path), fd, located[:8], read_one, lambda i, reason, n: reported.append(i))  # still usable
        assert sorted(reported[-8:]) == list(range(8))
    finally:
        os.close(fd)
        pool.close()
    with pytest.raises(ClosedError, match="closed"):
        pool.read(str(path), -1, located, read_one, lambda *a: None)


# -- announcing a read in parts -------------------------------------------------------------------------

PARTS = [(p, i) for p in range(2) for i in range(64)]  # part 0 of every value first


def parted_file(tmp_path) -> tuple[str, list]:
    """A file of 64 values of 100 bytes, each read in 2 parts of 50 (`part_extent`)."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * 100))
    return str(path), [(i * 100, 100, i) for i in range(64)]


def part_extent(i: int, part: int) -> tuple[int, int]:
    return (i * 100 + 50 * part, 50)


def announcer_call() -> bool:
    return threading.current_thread().name.startswith("kvtier-disk-announce")


@pytest.fixture
def advised(monkeypatch) -> list[tuple[int, int]]:
    """The (offset, length) of every POSIX_FADV_WILLNEED asked for, in order."""
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


@pytest.mark.parametrize("threads", [1, 4])
def test_the_announcer_advises_every_part_in_read_order_ahead_of_the_readers(tmp_path, advised, threads):
    path, located = parted_file(tmp_path)
    parts_read: list[tuple[int, int]] = []
    announced = threading.Condition()

    def read_one(fd: int, offset: int, length: int, i: int, part: int) -> str | None:
        with announced:  # each part is read once the kernel was asked for it
            if not announced.wait_for(lambda: part_extent(i, part) in advised, timeout=10):
                return "short"
            parts_read.append((part, i))
        return None if len(os.pread(fd, 50, offset + 50 * part)) == 50 else "short"

    def extent(i: int, part: int) -> tuple[int, int]:
        with announced:
            announced.notify_all()
        return part_extent(i, part)

    before = set(reader_threads("kvtier-disk-announce"))
    pool = ReaderPool(threads, min_part_bytes=1)
    fd = os.open(path, os.O_RDONLY)
    try:
        results: list[tuple[int, str | None]] = []
        pool.read(path, fd, located, read_one, lambda i, reason, n: results.append((i, reason)), 2, extent=extent)
        assert sorted(results) == [(i, None) for i in range(64)]
        assert advised == [part_extent(i, p) for p, i in PARTS]
        assert sorted(parts_read) == sorted(PARTS)
        assert len(set(reader_threads("kvtier-disk-announce")) - before) == 1
    finally:
        os.close(fd)
        pool.close()
    assert not set(reader_threads("kvtier-disk-announce")) - before  # the thread ends with the pool


def test_the_announcer_has_stopped_when_the_read_returns(tmp_path, advised):
    path, located = parted_file(tmp_path)
    calls: list[int] = []

    def slow_extent(i: int, part: int) -> tuple[int, int]:
        if announcer_call():
            calls.append(i)
            time.sleep(0.005)
        return part_extent(i, part)

    pool = ReaderPool(1, min_part_bytes=1)
    fd = os.open(path, os.O_RDONLY)
    try:
        pool.read(path, fd, located, lambda fd, o, n, i, part: None, lambda *a: None, 2, extent=slow_extent)
        seen = len(calls)
        time.sleep(0.05)
        assert len(calls) == seen < len(PARTS)  # stopped with the read, before the end of its parts
    finally:
        os.close(fd)
        pool.close()


def test_the_announcer_stays_within_its_window_ahead_of_the_readers(tmp_path, advised, monkeypatch):
    monkeypatch.setattr(readers, "ANNOUNCE_AHEAD_BYTES", 120)
    path, located = parted_file(tmp_path)
    read_bytes, ahead = [0], []

    def read_one(fd: int, offset: int, length: int, i: int, part: int) -> str | None:
        time.sleep(0.001)
        ahead.append(sum(n for _, n in advised) - read_bytes[0])
        read_bytes[0] += 50
        return None

    pool = ReaderPool(1, min_part_bytes=1)
    fd = os.open(path, os.O_RDONLY)
    try:
        pool.read(path, fd, located, read_one, lambda *a: None, 2, extent=part_extent)
    finally:
        os.close(fd)
        pool.close()
    assert max(ahead) <= 120 + 50 and len(advised) > 64  # within the window (one part of slack), yet advancing


def test_a_read_does_not_wait_for_another_reads_announcer(tmp_path):
    path, located = parted_file(tmp_path)
    release = threading.Event()

    def stuck_extent(i: int, part: int) -> tuple[int, int]:
        if announcer_call():
            release.wait(10)
        return part_extent(i, part)

    pool = ReaderPool(1, min_part_bytes=1)
    fd = os.open(path, os.O_RDONLY)
    first_done = threading.Event()
    try:
        def first() -> None:  # its announcer holds the pool's announcing thread until `release`
            def read_one(fd: int, o: int, n: int, i: int, part: int) -> None:
                release.wait(10)
            pool.read(path, fd, located, read_one, lambda *a: None, 2, extent=stuck_extent)
            first_done.set()

        thread = threading.Thread(target=first)
        thread.start()
        time.sleep(0.05)
        results: list[int] = []
        second = threading.Thread(target=lambda: pool.read(path, fd, located, lambda *a: None,
                                                           lambda i, reason, n: results.append(i), 2, extent=part_extent))
        second.start()
        second.join(5)
        assert not second.is_alive() and sorted(results) == list(range(64)) and not first_done.is_set()
    finally:
        release.set()
        thread.join(10)
        os.close(fd)
        pool.close()
    assert first_done.is_set()


def test_advice_that_fails_does_not_fail_the_read(tmp_path):
    path, located = parted_file(tmp_path)

    def failing(i: int, part: int) -> tuple[int, int]:
        if announcer_call():
            raise OSError(22, "Invalid argument")
        return part_extent(i, part)

    pool = ReaderPool(1, min_part_bytes=1)
    fd = os.open(path, os.O_RDONLY)
    try:
        reported: list[tuple[int, str | None]] = []
        read_one = lambda fd, o, n, i, part: None if len(os.pread(fd, 50, o + 50 * part)) == 50 else "short"  # noqa: E731
        pool.read(path, fd, located, read_one, lambda i, reason, n: reported.append((i, reason)), 2, extent=failing)
        pool.read(path + ".missing", fd, located, read_one,  # the announcer cannot open it
                  lambda i, reason, n: reported.append((i, reason)), 2, extent=part_extent)
        assert sorted(reported) == sorted([(i, None) for i in range(64)] * 2)
    finally:
        os.close(fd)
        pool.close()


@pytest.mark.parametrize("num_groups", [1, 2])  # whole values, or layer group by layer group
def test_an_engine_load_through_four_readers_fills_the_kv_and_the_host_slots(filled, num_groups):
    disk = DiskTier(filled, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB)
    host = HostTier(SPEC, N * BPB)
    transfer = Transferer({TierName.HOST: host, TierName.DISK: disk})
    try:
        buffer = HFKVBuffer.allocate(SPEC, N * SPEC.block_tokens)
        slots = list(reversed(range(N)))
        handle = transfer.load([key(i) for i in range(N)], [TierName.DISK] * N, slots, buffer, list(range(N)),
                               num_groups=num_groups)
        handle.wait(30)
        assert handle.failed == ()  # the host slots are filled when the handle ends (the engine may then reuse its KV)
        out = torch.empty((1, *SPEC.block_shape))
        for i in range(N):
            buffer.read_blocks([i], out, (0, SPEC.num_layers))
            assert torch.equal(out[0], block(i))
            assert torch.equal(host.pool.blocks(slots[i], 1)[0], block(i))
    finally:
        transfer.close()
        disk.close()


@pytest.mark.parametrize("num_groups", [1, 2])
def test_an_engine_load_with_a_corrupt_block_fails_from_it_on(filled, num_groups):
    at = HEADER_BYTES + 3  # a payload byte of layer 0: the checksum fails
    edit_value(filled, SPEC, key(10), lambda v: v[:at] + bytes([v[at] ^ 0xFF]) + v[at + 1:])
    disk = DiskTier(filled, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB)
    host = HostTier(SPEC, N * BPB)
    transfer = Transferer({TierName.HOST: host, TierName.DISK: disk})
    try:
        buffer = HFKVBuffer.allocate(SPEC, N * SPEC.block_tokens)
        handle = transfer.load([key(i) for i in range(N)], [TierName.DISK] * N, list(range(N)), buffer,
                               list(range(N)), num_groups=num_groups)
        handle.wait(30)
        assert handle.failed == tuple(key(i) for i in range(10, N))
        transfer.drain()
        out = torch.empty((1, *SPEC.block_shape))
        for i in range(10):
            assert torch.equal(host.pool.blocks(i, 1)[0], block(i))
            buffer.read_blocks([i], out, (0, SPEC.num_layers))
            assert torch.equal(out[0], block(i))
    finally:
        transfer.close()
        disk.close()
