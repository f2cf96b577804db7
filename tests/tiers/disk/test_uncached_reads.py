"""Reads around the page cache (`disk.uncached`): the same bytes as a buffered read at any offset, length and
place in memory, only when the bytes are out of the page cache, whole and by layer group, straight into host
slots, bad values still clean misses, a refused read served through the page cache, a failed one raised as
itself. Real files and LMDB stores in
temp dirs, evicted for real (`coldcache.evict_file`)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random

import pytest

from diskutil import SPEC, block, edit_value, empty, key
from kvtier.scheduler.config import OffloadConfig
from kvtier.tiers import coldcache
from kvtier.tiers.disk import readers
from kvtier.tiers.disk.format import HEADER_BYTES, PAYLOAD_IN_PAGE
from kvtier.tiers.disk.uncached import ALIGN, UncachedFile, mostly_cold, preadv, resident_bytes
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.pool import HostTier

N = 24
BPB = SPEC.bytes_per_block


def uncached_file(path: str) -> UncachedFile:
    try:
        return UncachedFile(path)
    except OSError as err:
        pytest.skip(f"the temp dir's file system refuses O_DIRECT ({err})")


@pytest.fixture
def data_file(tmp_path):
    path = str(tmp_path / "data.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(5 * ALIGN + 123))  # does not end on an aligned boundary
    return path


def test_uncached_reads_the_same_bytes_as_a_buffered_read(data_file):
    expected = open(data_file, "rb").read()
    f = uncached_file(data_file)
    try:
        for offset, sizes in ((0, [100]), (17, [4096]), (4095, [1, 2, 8190]), (3 * ALIGN - 80, [64, 8000]),
                              (5 * ALIGN, [123]), (100, [5, 0, 7])):
            bufs = [memoryview(bytearray(n)) for n in sizes]
            assert preadv(f, bufs, offset) == sum(sizes)
            assert b"".join(bytes(b) for b in bufs) == expected[offset:offset + sum(sizes)]
    finally:
        f.close()


def test_buffers_placed_in_their_pages_as_the_file_get_the_same_bytes(tmp_path):
    """Buffers at the same place in their page as their bytes in the file are read into in place (whole pages)
    beside bounced edges and other buffers: random offsets, lengths and places, the file's end included;
    nothing around a buffer is written, and no read falls back to the page cache."""
    path, rng = str(tmp_path / "big.bin"), random.Random(7)
    expected = os.urandom(64 * ALIGN)
    with open(path, "wb") as f:
        f.write(expected)
    memory = bytearray(40 * ALIGN)
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    f = uncached_file(path)
    try:
        for _ in range(60):
            offset, n, head = rng.randrange(60 * ALIGN), rng.randrange(1, 30 * ALIGN), rng.choice([0, 7, 64])
            place = (offset + head) % ALIGN if rng.random() < 0.7 else rng.randrange(ALIGN)
            start = (place - base) % ALIGN
            memory[:] = b"\xa5" * len(memory)
            bufs = [memoryview(bytearray(head)), memoryview(memory)[start:start + n],
                    memoryview(bytearray(rng.randrange(3 * ALIGN)))]
            total = sum(len(b) for b in bufs)
            got = preadv(f, bufs, offset)
            assert got == min(total, len(expected) - offset)
            assert b"".join(bytes(b) for b in bufs)[:got] == expected[offset:offset + got]
            assert memory[:start].count(0xA5) == start and memory[start + n:].count(0xA5) == len(memory) - start - n
        assert f._plain is None  # every read was an O_DIRECT one
    finally:
        f.close()


def test_an_uncached_read_past_the_end_is_short_like_a_buffered_one(data_file):
    size = os.path.getsize(data_file)
    f = uncached_file(data_file)
    fd = os.open(data_file, os.O_RDONLY)
    try:
        for offset, n in ((size - 10, 50), (size, 8), (size + ALIGN, 8)):
            uncached, plain = memoryview(bytearray(n)), memoryview(bytearray(n))
            got = preadv(f, [uncached], offset)
            assert got == os.preadv(fd, [plain], offset) == max(0, min(n, size - offset))
            assert bytes(uncached[:got]) == bytes(plain[:got])
    finally:
        os.close(fd)
        f.close()


def test_residency_is_told_by_range(data_file):
    if coldcache.evict_file(data_file):
        pytest.skip("cannot evict a file from the page cache here")
    size, page = os.path.getsize(data_file), mmap.PAGESIZE
    fd = os.open(data_file, os.O_RDONLY)
    try:
        assert resident_bytes(fd, 0, size) == 0
        assert mostly_cold(fd, [(0, 100), (200, size - 200)])
        os.pread(fd, 1, page)  # one page (perhaps more, by readahead)
        assert resident_bytes(fd, page, page) == page
        assert not mostly_cold(fd, [(page, 10), (page + 100, 10)])  # joined: one span, resident
    finally:
        os.close(fd)


def test_a_refused_uncached_read_goes_through_the_page_cache(data_file, monkeypatch):
    expected = open(data_file, "rb").read()
    f = uncached_file(data_file)
    real = os.preadv

    def refusing(fd, bufs, offset):  # a file system that opens O_DIRECT but refuses the read
        if fd == f.fd:
            raise OSError(errno.EINVAL, "refused")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", refusing)
    try:
        for offset in (17, 3 * ALIGN):
            buf = memoryview(bytearray(1000))
            assert preadv(f, [buf], offset) == 1000
            assert bytes(buf) == expected[offset:offset + 1000]
    finally:
        f.close()
        f.close()  # idempotent


# -- through the disk tier -------------------------------------------------------------------------------

@pytest.fixture
def cold_store(store):
    """A store holding blocks 0..N-1, closed and out of the page cache."""
    with DiskTier(store, SPEC, 4 * N * BPB) as disk:
        disk.put_many([key(i) for i in range(N)], [block(i) for i in range(N)])
    if coldcache.evict_file(DiskTier.data_file_of(store)):
        pytest.skip("cannot evict the store's data file from the page cache here")
    return store


@pytest.fixture
def opened(monkeypatch):
    """The UncachedFiles the readers open."""
    files = []

    class Recorded(UncachedFile):
        def __init__(self, path):
            super().__init__(path)
            files.append(self)

    monkeypatch.setattr(readers, "UncachedFile", Recorded)
    return files


def values_resident(store: str) -> int:
    """Bytes of the store's data file in the page cache, B-tree pages aside (values are BPB + header each)."""
    return coldcache.resident_bytes(DiskTier.data_file_of(store))


@pytest.mark.parametrize("groups", [None, [(0, 1), (1, 2)]])
def test_a_cold_restore_is_read_uncached_and_exact(cold_store, groups, opened):
    """Whole values and by layer group alike."""
    uncached_file(DiskTier.data_file_of(cold_store)).close()  # skips where O_DIRECT is refused
    with DiskTier(cold_store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        outs = [empty() for _ in range(N)]
        assert disk.get_many([key(i) for i in range(N)], outs, layer_groups=groups) == [True] * N
        # the values went around the page cache: what is resident is the B-tree lookups' pages, not N values
        assert values_resident(cold_store) < N * BPB // 2
    assert len(opened) == 4 and all(f.fd is None for f in opened)  # one per reader, closed
    for i, out in enumerate(outs):
        assert out.equal(block(i))


def test_a_cold_read_lands_straight_in_host_slots(cold_store, monkeypatch):
    """The host pool's slots sit in their pages as values' payloads do in the file, so an uncached read puts
    each value's whole pages straight into its slot (the read's own memory) and copies only the edges."""
    uncached_file(DiskTier.data_file_of(cold_store)).close()
    host = HostTier(SPEC, N * BPB)
    assert all(host.pool.block(i).data_ptr() % ALIGN == PAYLOAD_IN_PAGE for i in range(N))
    real, targets = os.preadv, set()

    def recording(fd, bufs, offset):
        targets.update(ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in bufs if len(b))
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", recording)
    with DiskTier(cold_store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        slots = list(reversed(range(N)))
        found = disk.get_many([key(i) for i in range(N)], [host.pool.block(s) for s in slots])
    assert found == [True] * N
    for i, s in enumerate(slots):
        assert host.pool.block(s).data_ptr() + ALIGN - PAYLOAD_IN_PAGE in targets  # its first whole page
        assert host.pool.blocks(s, 1)[0].equal(block(i))


def test_a_warm_restore_reads_through_the_page_cache(cold_store, opened):
    with DiskTier(cold_store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        keys, outs = [key(i) for i in range(N)], [empty() for _ in range(N)]
        fd = os.open(DiskTier.data_file_of(cold_store), os.O_RDONLY)
        os.read(fd, os.path.getsize(DiskTier.data_file_of(cold_store)))  # everything in the page cache
        os.close(fd)
        assert disk.get_many(keys, outs) == [True] * N
    assert opened == []
    assert all(out.equal(block(i)) for i, out in enumerate(outs))


def test_uncached_reads_off_read_through_the_page_cache(cold_store):
    with DiskTier(cold_store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB, uncached_reads=False) as disk:
        outs = [empty() for _ in range(N)]
        assert disk.get_many([key(i) for i in range(N)], outs) == [True] * N
        assert values_resident(cold_store) >= N * BPB
    assert all(out.equal(block(i)) for i, out in enumerate(outs))


def test_a_corrupt_value_read_uncached_is_a_clean_miss(store, opened):
    with DiskTier(store, SPEC, 4 * N * BPB) as disk:
        disk.put_many([key(i) for i in range(N)], [block(i) for i in range(N)])

    def flip(value: bytearray) -> bytearray:
        value[HEADER_BYTES + BPB - 1] ^= 0xFF  # the payload's last byte
        return value

    edit_value(store, SPEC, key(5), flip)
    if coldcache.evict_file(DiskTier.data_file_of(store)):
        pytest.skip("cannot evict the store's data file from the page cache here")
    uncached_file(DiskTier.data_file_of(store)).close()
    with DiskTier(store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        outs = [empty() for _ in range(N)]
        found = disk.get_many([key(i) for i in range(N)], outs)
        assert disk.stats().corrupt == 1
    assert opened  # read uncached
    assert found == [i != 5 for i in range(N)]
    assert all(out.equal(block(i)) for i, out in enumerate(outs) if i != 5)


def test_a_failed_uncached_read_is_raised_as_itself(cold_store, opened, monkeypatch):
    uncached_file(DiskTier.data_file_of(cold_store)).close()
    real = os.preadv

    def failing(fd, bufs, offset):
        if any(fd == f.fd for f in opened):
            raise OSError(errno.EIO, "disk error")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", failing)
    with DiskTier(cold_store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        with pytest.raises(OSError) as raised:
            disk.get_many([key(i) for i in range(N)], [empty() for _ in range(N)])
    assert raised.value.errno == errno.EIO  # not a BufferError from releasing the reader's buffer
    assert opened and all(f.fd is None for f in opened)


def test_uncached_reads_is_a_bool():
    assert OffloadConfig().disk_uncached_reads is True
    with pytest.raises(ConfigError, match="disk_uncached_reads: expected true or false"):
        OffloadConfig(disk_uncached_reads="yes")
    with pytest.raises(ConfigError, match="uncached_reads: expected true or false"):
        readers.ReaderPool(uncached=1)
