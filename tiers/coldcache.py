"""Truly cold reads for benchmarks: evict a file from the page cache, prove it, and time the limit.

docs/design.md "Cold page cache": `posix_fadvise(DONTNEED)` does not evict pages that are still mapped, so a
"cold" read of an LMDB file whose environment is still open reads from RAM. The caller must close every
LMDB environment and mapping of the file first (every `DiskTier` on the store: `tier.close()`, or
`tier.reopen()` after the eviction); `evict_file` refuses a store this process still has open.

Primitives:
- `evict_file(path)` -> bytes still resident after trying `posix_fadvise(DONTNEED)` (after an fdatasync,
  since only clean pages can be dropped) and, when that leaves pages and this process may, writing "1" to
  /proc/sys/vm/drop_caches.
- `resident_bytes(path)`: bytes of the file in the page cache, by `mincore` over a fresh read-only mapping
  (mapping without touching faults nothing in), or `fincore` when mincore is unavailable.
- `cold_sequential_read_s(path, block_size)`: seconds to read the whole file sequentially into one reused
  buffer with `os.readv` (the limit a disk restore is compared with); evict first for a cold figure.
- `write_file(path, num_bytes)`: a file of incompressible bytes, synced (the limit's input).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

from kvtier.tiers.disk import env as diskenv
from kvtier.tiers.disk import uncached
from kvtier.tiers.errors import StoreError

log = logging.getLogger(__name__)


def _check_not_open(path: str) -> None:
    real = os.path.realpath(path)
    for store in diskenv.open_paths():
        if real == store or os.path.dirname(real) == store:
            raise StoreError(f"{path!r} belongs to disk store {store!r}, still open in this process; close every "
                             f"DiskTier on it before evicting (mapped pages cannot be evicted)")


def resident_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of `path` now in the page cache (page granularity).

    Raises:
        OSError: the file cannot be opened, and neither mincore nor fincore works.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        resident = uncached.resident_bytes(fd, 0, size)
    finally:
        os.close(fd)
    return _fincore(path) if resident is None else resident


def _fincore(path: str) -> int:
    tool = shutil.which("fincore")
    if tool is None:
        raise OSError(f"cannot tell the resident bytes of {path!r}: mincore failed and fincore is missing")
    out = subprocess.run([tool, "--bytes", "--noheadings", "--raw", "--output", "RES", path], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return int(out.split()[0])


def evict_file(path: str | os.PathLike[str]) -> int:
    """Drops `path`'s pages from the page cache, as far as this process can.

    The caller must have closed every mapping of the file (every DiskTier on its store).

    Returns:
        bytes still resident afterwards (0 when the file is fully cold).

    Raises:
        StoreError: the file belongs to a disk store still open in this process.
    """
    path = os.fspath(path)
    _check_not_open(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = resident_bytes(path)
    if left:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            left = resident_bytes(path)
        except OSError as err:
            log.info("cannot drop caches (%s); %d bytes of %s stay resident", err, left, path)
    return left


def cold_sequential_read_s(path: str | os.PathLike[str], block_size: int = 8 << 20) -> float:
    """Seconds to read the whole file sequentially into one reused buffer (`os.readv`).

    Call `evict_file(path)` first for a cold figure.
    """
    buf = bytearray(block_size)
    views = [memoryview(buf)]
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        start = time.perf_counter()
        while os.readv(fd, views) > 0:
            pass
        return time.perf_counter() - start
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], num_bytes: int, block_size: int = 8 << 20) -> None:
    """Writes `num_bytes` of incompressible bytes to `path` and syncs it."""
    chunk = os.urandom(min(block_size, max(num_bytes, 1)))
    with open(path, "wb") as f:
        left = num_bytes
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
