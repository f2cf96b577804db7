"""Reading data.mdb around the page cache (O_DIRECT) when the bytes are not in it: an uncached read.

Why: on this project's machine (Linux 6.18, ext4 on virtio) a cold buffered read spends much of its CPU
filling the page cache, more with several readers (they contend on it) and more in parts than as one stream
(the kernel fills it page by page when reads skip bytes). 93 MB cold, 3 MB reads, other core busy, median of
5: one buffered stream 58 ms / 23 ms CPU, 4 buffered readers 75 ms / 38 ms CPU (in 4 parts: 75 / 38),
4 uncached readers 70 ms / 13 ms CPU (in 4 parts: 76 / 21; without the copy out of the aligned buffer
6 ms). Where an engine computes on the same cores while it reads, that CPU is what its TTFT pays
(docs/disk-reads.md "Reading around the page cache"). An uncached read skips the page cache both ways: bytes
already in it are read from the disk again (dirty ones written back first), so readers go uncached only
when `mostly_cold` says the bytes are out of it, and what they read is not kept there (the host tier is
kvtier's cache of hot blocks). Reads in parts (an engine's layer groups) go uncached too, unannounced
(`disk.readers`): into host slots placed for them they cost about the CPU of whole ones.

Primitives:
- `UncachedFile(path)`: a descriptor opened with O_DIRECT; `preadv(bufs, offset)` reads the aligned span
  around the bytes, returning what `os.preadv` would: the whole pages of a buffer placed in its page as its
  bytes are in the file (a host slot, `pool.HostTier`) straight into it, the rest into the calling thread's
  aligned buffer (kept from one read to the next) and copied out. A file system that refuses O_DIRECT
  (some FUSE, old tmpfs) raises on open; a read it refuses (EINVAL) falls back to a buffered descriptor of
  the same file, for good.
- `preadv(f, bufs, offset)` / `close(f)`: for a plain descriptor or an `UncachedFile` alike.
- `resident_bytes(fd, offset, length)`: bytes of that range in the page cache (`mincore`), None when it
  cannot be told; `mostly_cold(fd, spans)`: whether a read of those (offset, length) spans may go
  uncached.
- `huge_page_mapping(size)`: memory on transparent huge pages, what the aligned buffers and the CPU pools
  are made of: an uncached read into 4 KiB pages reaches this VM's virtio disk as requests of 744 KB
  (186 pieces each), into huge pages as one request per read, ~2x faster (docs/disk-reads.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import threading
from typing import Sequence, Union

import numpy as np

#: the alignment of an uncached read's offset, length and memory (the largest logical block size in use)
ALIGN = 4096
#: a read goes uncached when at most this share of its bytes is in the page cache (what it reads again)
RESIDENT_AT_MOST = 0.25

#: an aligned buffer grows by this much (a value of the engine's geometry here is ~3 MB)
BUFFER_STEP = 4 << 20

log = logging.getLogger(__name__)
_local = threading.local()
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 1024
_PAGE = mmap.PAGESIZE


class UncachedFile:
    """One reader's O_DIRECT descriptor of a file (used by one thread at a time; the aligned buffer it reads
    through is its thread's own)."""

    def __init__(self, path: str) -> None:
        """
        Raises:
            OSError: the file cannot be opened, or its file system (or platform) refuses O_DIRECT.
        """
        if not hasattr(os, "O_DIRECT"):
            raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform", path)
        self.path = path
        self.fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        self._plain: int | None = None  # a buffered descriptor, once an uncached read was refused

    def preadv(self, bufs: Sequence[memoryview], offset: int) -> int:
        """Reads into `bufs` in order from `offset`; returns what `os.preadv` would (fewer bytes at the end).

        The whole pages of a buffer that sits at the same place in its page as its bytes do in the file are
        read straight into it; the rest of the aligned span goes through this thread's aligned buffer. As
        after a short `os.preadv`, a buffer's bytes past what was read are undefined."""
        if self._plain is not None:
            return os.preadv(self._plain, bufs, offset)
        size = sum(len(b) for b in bufs)
        if not size:
            return 0
        lo, hi = offset - offset % ALIGN, -(-(offset + size) // ALIGN) * ALIGN
        direct = _in_place(bufs, offset)
        if 2 * len(direct) + 1 > _IOV_MAX:  # more pieces than one call takes: all through the aligned buffer
            direct = []
        with _aligned(hi - lo - sum(stop - start for start, stop, _ in direct)) as bounce:
            iov, bounced, cursor, used = [], [], lo, 0  # bounced: (file start, file stop, where in `bounce`)
            for start, stop, mem in [*direct, (hi, hi, None)]:
                if start > cursor:
                    iov.append(bounce[used:used + start - cursor])
                    bounced.append((cursor, start, used))
                    used += start - cursor
                if mem is not None:
                    iov.append(mem)
                cursor = stop
            try:
                got = os.preadv(self.fd, iov, lo)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                log.warning("%s: O_DIRECT read refused (%s); reading through the page cache", self.path, err)
                self._plain = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                return os.preadv(self._plain, bufs, offset)
            finally:  # drop its views of `bounce`: an error's traceback keeps this frame, and views of the buffer
                iov.clear()  # would keep `_aligned` from replacing it (BufferError on the thread's next read)
            end = min(offset + size, lo + got)
            pos = offset
            for buf in bufs:  # the bytes that came through `bounce` to their buffers
                for start, stop, at in bounced:
                    a, b = max(start, pos), min(stop, pos + len(buf), end)
                    if a < b:
                        buf[a - pos:b - pos] = bounce[at + a - start:at + b - start]
                pos += len(buf)
        return max(0, end - offset)

    def close(self) -> None:
        """Closes the descriptors (idempotent)."""
        fds, self.fd, self._plain = (self.fd, self._plain), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)


def _in_place(bufs: Sequence[memoryview], offset: int) -> list[tuple[int, int, memoryview]]:
    """(file start, file stop, memory) of the whole pages an uncached read can put straight into `bufs` (read
    in order from `offset`): those of a buffer at the same place in its page as its bytes in the file."""
    out, pos = [], offset
    for buf in bufs:
        if len(buf) >= 2 * ALIGN and not buf.readonly:
            address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            if address % ALIGN == pos % ALIGN:  # then at least one whole page
                start, stop = -(-pos // ALIGN) * ALIGN, (pos + len(buf)) // ALIGN * ALIGN
                out.append((start, stop, buf[start - pos:stop - pos]))
        pos += len(buf)
    return out


def _aligned(size: int) -> memoryview:
    """A view of `size` bytes of this thread's page-aligned buffer (grown in BUFFER_STEP steps; a reader
    thread keeps it from one read to the next), on huge pages as a host slot is (`huge_page_mapping`)."""
    buf, start = getattr(_local, "buffer", None), getattr(_local, "start", 0)
    if buf is None or len(buf) - start < size:
        if buf is not None:
            buf.close()
        buf, start = huge_page_mapping(-(-max(size, 1) // BUFFER_STEP) * BUFFER_STEP)
        _local.buffer, _local.start = buf, start
    return memoryview(buf)[start:start + size]


def _huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


#: the transparent huge page size memory read into is aligned to (2 MiB on x86-64)
HUGE_PAGE = _huge_page_size()


def huge_page_mapping(size: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping with `size` bytes from a huge page boundary, and the boundary's offset in
    it; advised to be backed by transparent huge pages where the kernel offers them (not with
    `KVTIER_HUGE_PAGES=0` in the environment). Why: a read into 4 KiB pages reaches the disk cut into
    requests of 744 KB (186 pieces each) here, into huge pages as one request (docs/disk-reads.md)."""
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))
    if hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("KVTIER_HUGE_PAGES", "1").strip() != "0":
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # transparent huge pages off in this kernel: plain pages
            pass
    # the address as `_in_place` takes it (the temporary export ends with the expression: the mapping can be closed)
    return buf, -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE


#: what a reader reads from: a plain descriptor or a `UncachedFile`
Readable = Union[int, UncachedFile]


def preadv(f: Readable, bufs: Sequence[memoryview], offset: int) -> int:
    """`os.preadv(f, bufs, offset)` for a plain descriptor, `f.preadv(bufs, offset)` for a `UncachedFile`."""
    return os.preadv(f, bufs, offset) if isinstance(f, int) else f.preadv(bufs, offset)


def close(f: Readable) -> None:
    """`os.close(f)` for a plain descriptor, `f.close()` for an `UncachedFile`."""
    os.close(f) if isinstance(f, int) else f.close()


def resident_bytes(fd: int, offset: int, length: int) -> int | None:
    """Bytes of `fd`'s range [offset, offset + length) in the page cache (page granularity), or None when
    it cannot be told (mapping or mincore refused). Maps without touching: nothing is faulted in."""
    lo = offset - offset % _PAGE
    size = offset + length - lo
    if size <= 0:
        return 0
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
    if addr in (None, _MAP_FAILED):
        return None
    try:
        vec = (ctypes.c_ubyte * -(-size // _PAGE))()
        if _libc.mincore(addr, size, vec) != 0:
            return None
        return min(int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) * _PAGE, size)
    finally:
        _libc.munmap(addr, size)


def mostly_cold(fd: int, spans: Sequence[tuple[int, int]]) -> bool:
    """Whether at most RESIDENT_AT_MOST of the bytes of `spans` ((offset, length), in file order, those
    less than a page apart joined) are in the page cache; unknown: no."""
    total = resident = 0
    for offset, length in _joined(spans):
        got = resident_bytes(fd, offset, length)
        if got is None:
            return False
        total, resident = total + length, resident + got
    return resident <= RESIDENT_AT_MOST * total


def _joined(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) spans in file order, those less than a page apart joined into one."""
    out: list[list[int]] = []
    for offset, length in spans:
        if out and offset - (out[-1][0] + out[-1][1]) < _PAGE:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]
