"""One shared LMDB environment per store path in this process, and where its map lies in the file.

LMDB forbids two `Environment` objects on one path in one process, yet one store may hold several
models (one `DiskTier` per spec). So environments live in a module-level registry keyed by the real
path, with a reference count: every `DiskTier` on a path shares one `SharedEnv`, and the last `release`
closes it.

Primitives:
- `acquire(path, map_size, max_map_size, readonly)` -> `SharedEnv` (opens or shares; checks the store
  format version); `SharedEnv.release()`.
- `SharedEnv.blocks_db`, `index_db`, `meta_db`: the sub-databases (blocks; key -> value length; format
  version and per-spec counters).
- `SharedEnv.txn(write)`: a transaction as a context manager (buffers=True: values are memoryviews into
  the map), counted so that a map resize waits until no transaction of this process is open.
- `SharedEnv.grow(min_size)`: enlarges the map (LMDB requires no open transaction in the process).
- `SharedEnv.locate(cursor, lmdb_key)` -> (file offset, length) of a value in data.mdb, `None` when the
  key is absent, or `UNLOCATED` when the value cannot be located without reading it (then the caller
  reads it through LMDB). Why: py-lmdb touches every page of a value it returns ("preload", one fault per
  4 KiB, GIL released), so `txn.get` of an 8 MiB value reads all of it through the map; `cursor.set_key`
  touches only the value's first page. The offset comes from the leaf node that the cursor's key points
  into (LMDB 0.9 node layout: u16 lo, u16 hi, u16 flags, u16 ksize, key, then the overflow page number of
  an F_BIGDATA value). `DiskTier`'s reads go through it.
- `SharedEnv.file_offset(view)`: the offset in data.mdb of memory inside LMDB's map (found from the
  mapping's address in /proc/self/maps: LMDB's `map_addr` is 0 without MDB_FIXEDMAP), or None.
- `SharedEnv.fd`: a read-only descriptor of data.mdb for `os.preadv` (its own file readahead state,
  advised sequential).

Invariants: the env is opened with LMDB's durable defaults (sync, metasync, lock, no writemap), so every
committed write transaction survives a SIGKILL or a power cut; a store whose meta records another
format version is never opened (`StoreFormatError`). The map is opened without readahead
(`MADV_RANDOM`): lookups fault in single B-tree pages, and values are read with `os.preadv` in file order
(`diskread.read_value_at`) from `SharedEnv.fd`, whose own readahead then streams them. Measured on this
project's machine (virtio disk with an 8 MiB readahead window, 94 MB of values, cold): each fault in a
map with readahead read 8 MiB around it synchronously, and reading values through the map ran at
0.35-0.6 of a cold sequential read, with preads in file order at 0.9-1.0. A value read through the map
(the rare fallback when `locate` fails) is faulted in page by page. A located offset is only a hint to
a caller reading at it: the value's header and checksum decide.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
import threading
from typing import Iterator, Sequence

import lmdb
import numpy as np

from .diskformat import STORE_FORMAT_VERSION
from .errors import StoreError, StoreFormatError
from .tier import format_size

log = logging.getLogger(__name__)

BLOCKS_DB = b"kvtier-blocks"
META_DB = b"kvtier-meta"
#: fingerprint + key -> stored value length (u64), written in the same transaction as the block: listing,
#: membership and overwrite checks read this small B-tree, never a block's pages
INDEX_DB = b"kvtier-index"
VERSION_KEY = b"format_version"
_WAIT_S = 60.0
#: `locate` could not find a value's place without reading it
UNLOCATED = "unlocated"
_NODE = struct.Struct("<HHHH")  # LMDB 0.9 MDB_node header (little-endian): lo, hi, flags, ksize
_PGNO = struct.Struct("<Q")
_F_BIGDATA = 0x01
_PAGE_HEADER_BYTES = 16  # MDB_page header on 64-bit builds: the payload of an overflow page starts after it

_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

_registry: dict[str, "SharedEnv"] = {}
_registry_lock = threading.Lock()


class SharedEnv:
    """An open LMDB environment shared by every `DiskTier` on its path in this process."""

    def __init__(self, path: str, map_size: int, max_map_size: int, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self.max_map_size = max_map_size
        self.refcount = 0
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False
        self._map_ranges: list[tuple[int, int, int]] | None = None
        try:
            if not readonly:
                os.makedirs(path, exist_ok=True)
                if not os.access(path, os.W_OK | os.X_OK):
                    raise PermissionError(f"no write permission on {path}")
            elif not os.path.isfile(os.path.join(path, "data.mdb")):
                raise FileNotFoundError(f"no LMDB store (data.mdb) in {path}")
            self.env = lmdb.open(path, map_size=map_size, max_dbs=4, max_readers=512, readonly=readonly,
                                 subdir=True, create=not readonly, sync=True, metasync=True, lock=True,
                                 writemap=False, readahead=False)
        except (OSError, lmdb.Error) as err:
            raise StoreError(f"disk store path {path!r}: cannot open an LMDB store there "
                             f"({'read-only' if readonly else 'read-write'}): {err}") from err
        try:
            self.blocks_db = self.env.open_db(BLOCKS_DB, create=not readonly)
            self.meta_db = self.env.open_db(META_DB, create=not readonly)
            self.index_db = self.env.open_db(INDEX_DB, create=not readonly)
            self._check_version()
            self.data_file = os.path.join(path, "data.mdb")
            self.fd = os.open(self.data_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if hasattr(os, "posix_fadvise"):  # reads go in file order: a doubled readahead window (steadier here)
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except lmdb.NotFoundError as err:
            self.env.close()
            raise StoreError(f"disk store {path!r} is not a kvtier store (no {BLOCKS_DB.decode()} database)") from err
        except BaseException:
            self.env.close()
            raise
        self._inode = os.fstat(self.fd).st_ino
        self.page_size = int(self.env.stat()["psize"])
        if not readonly:
            stale = self.env.reader_check()  # reader slots of killed processes would pin old pages forever
            if stale:
                log.info("disk store %s: cleared %d stale reader slots", path, stale)

    def _check_version(self) -> None:
        with self.env.begin(write=not self.readonly) as txn:
            stored = txn.get(VERSION_KEY, db=self.meta_db)
            if stored is None:
                if self.readonly:
                    raise StoreError(f"disk store {self.path!r} has no format version record (not a kvtier store)")
                txn.put(VERSION_KEY, str(STORE_FORMAT_VERSION).encode(), db=self.meta_db)
                return
        try:
            version = int(bytes(stored).decode())
        except (UnicodeDecodeError, ValueError):
            version = None
        if version != STORE_FORMAT_VERSION:
            raise StoreFormatError(
                f"disk store {self.path!r} has format version {bytes(stored)[:32]!r}; this kvtier reads and writes "
                f"version {STORE_FORMAT_VERSION} only. Use another path, or delete the store (its KV can be "
                f"recomputed).")

    # -- transactions -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def txn(self, write: bool = False) -> Iterator[lmdb.Transaction]:
        """A transaction (values as memoryviews); commits on success, aborts on an exception.

        Raises:
            StoreError: the store is read-only and `write` was asked, or a resize kept it busy too long.
        """
        if write and self.readonly:
            raise StoreError(f"disk store {self.path!r} is open read-only")
        with self._cond:
            if not self._cond.wait_for(lambda: not self._resizing, _WAIT_S):
                raise StoreError(f"disk store {self.path!r}: map resize did not finish within {_WAIT_S:.0f} s")
            self._active += 1
        try:
            try:
                txn = self.env.begin(write=write, buffers=True)
            except lmdb.MapResizedError:
                # another process grew the map: adopt its size, then retry once
                self._adopt_map_size()
                txn = self.env.begin(write=write, buffers=True)
            with txn:
                yield txn
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _adopt_map_size(self) -> None:
        with self._cond:
            self._active -= 1
            try:
                self._resize_locked(0)
            finally:
                self._active += 1

    def _resize_locked(self, size: int) -> None:
        self._resizing = True
        try:
            if not self._cond.wait_for(lambda: self._active == 0, _WAIT_S):
                raise StoreError(f"disk store {self.path!r}: transactions stayed open for {_WAIT_S:.0f} s; "
                                 f"cannot resize the map")
            self.env.set_mapsize(size)
            self._map_ranges = None
        finally:
            self._resizing = False
            self._cond.notify_all()

    @property
    def map_size(self) -> int:
        """The current map size (the most the data file may grow to)."""
        return int(self.env.info()["map_size"])

    def grow(self, min_size: int) -> bool:
        """Grows the map to at least `min_size` (doubling), up to `max_map_size`.

        Returns:
            False when the map is already at its limit (nothing changed).
        """
        with self._cond:
            current = self.map_size
            if current >= min_size:
                return True
            target = min(max(min_size, current * 2), self.max_map_size)
            if target <= current or target < min_size:
                return False
            self._resize_locked(target)
            log.info("disk store %s: map grown from %s to %s", self.path, format_size(current), format_size(target))
            return True

    # -- where values lie in the file ----------------------------------------------------------------

    def _ranges(self) -> list[tuple[int, int, int]]:
        ranges = self._map_ranges
        if ranges is None:
            ranges = []
            try:
                with open("/proc/self/maps", "rb") as f:
                    for line in f:
                        parts = line.split(None, 5)
                        if len(parts) < 6 or int(parts[4]) != self._inode or not parts[5].rstrip().endswith(
                                b"data.mdb"):
                            continue
                        lo, hi = (int(x, 16) for x in parts[0].split(b"-"))
                        ranges.append((lo, hi, int(parts[2], 16)))
            except OSError:
                ranges = []
            self._map_ranges = ranges
        return ranges

    def locate(self, cursor: lmdb.Cursor, lk: bytes) -> tuple[int, int] | str | None:
        """Where `lk`'s value lies in data.mdb, touching only its first page (see the module docstring).

        Args:
            cursor: a cursor on `blocks_db` of an open transaction (the result is valid while it is open).
            lk: the LMDB key.

        Returns:
            (file offset, length); None when the key is absent; `UNLOCATED` when the value is stored inline
            or the node does not look as expected (the caller then reads it through LMDB).
        """
        if not cursor.set_key(lk):
            return None
        key_view = cursor.key()
        if self.file_offset(key_view, before=_NODE.size, after=_PGNO.size) is None:
            return UNLOCATED
        addr = np.frombuffer(key_view, dtype=np.uint8).ctypes.data
        node = ctypes.string_at(addr - _NODE.size, _NODE.size + len(lk) + _PGNO.size)
        lo, hi, flags, ksize = _NODE.unpack_from(node)
        if ksize != len(lk) or not flags & _F_BIGDATA or node[_NODE.size:_NODE.size + ksize] != lk:
            return UNLOCATED
        size = lo | hi << 16
        offset = _PGNO.unpack_from(node, _NODE.size + ksize)[0] * self.page_size + _PAGE_HEADER_BYTES
        if offset + size > os.fstat(self.fd).st_size:
            return UNLOCATED
        return offset, size

    def file_offset(self, view: memoryview, before: int = 0, after: int = 0) -> int | None:
        """The offset in data.mdb of the first byte of `view` (memory of an open transaction), or None when
        `view` (widened by `before` and `after` bytes) does not lie inside LMDB's map."""
        addr = np.frombuffer(view, dtype=np.uint8).ctypes.data
        end = addr + len(view) + after
        for lo, hi, pgoff in self._ranges():
            if lo <= addr - before and end <= hi:
                return addr - lo + pgoff
        return None

    def forget_first_pages_of_cold(self, located: Sequence[tuple[int, int, int]]) -> None:
        """Drops from the page cache the first page of each cold value in `located` ((file offset, length,
        _) from `locate`), so that reading the values streams.

        `locate` faults each value's first page into the map (LMDB reads the overflow page's header). A
        cold value whose first page is cached no longer streams: the kernel's readahead stops at the cached
        page and starts over (measured on this project's machine: 94 MB of values read at 0.6-0.8x of a
        cold sequential read this way, 0.95-1.0x with those pages dropped). A value is cold when its second
        page is not in the page cache (`mincore` on the map); warm values keep their pages. The page is
        unmapped from this process first (`MADV_DONTNEED`; the next access faults it in again): the kernel
        does not drop a mapped page. Best effort: without `mincore` nothing is dropped.
        """
        page, vec = self.page_size, (ctypes.c_ubyte * 1)()
        for offset, length, _ in located:
            first = offset - offset % page
            addr = self._map_address(first)
            if addr is None or length <= 2 * page:
                continue
            if _LIBC.mincore(ctypes.c_void_p(addr + page), page, vec) != 0:
                return
            if vec[0] & 1:  # the value's second page is cached: warm
                continue
            _LIBC.madvise(ctypes.c_void_p(addr), page, _MADV_DONTNEED)
            os.posix_fadvise(self.fd, first, page, os.POSIX_FADV_DONTNEED)

    def _map_address(self, file_offset: int) -> int | None:
        """The address of `file_offset` of data.mdb in LMDB's map (page aligned), or None."""
        for lo, hi, pgoff in self._ranges():
            addr = lo + file_offset - pgoff
            if lo <= addr < hi:
                return addr
        return None

    # -- lifetime ------------------------------------------------------------------------------------

    def release(self) -> None:
        """Drops one reference; the last closes the environment and the descriptor."""
        with _registry_lock:
            self.refcount -= 1
            if self.refcount > 0:
                return
            _registry.pop(self.path, None)
        os.close(self.fd)
        self.env.close()


def acquire(path: str | os.PathLike[str], map_size: int, max_map_size: int, readonly: bool) -> SharedEnv:
    """Opens the store at `path` or shares the one already open in this process.

    Args:
        path: the store's directory (created when missing unless `readonly`).
        map_size: the map size this user needs; a shared env grows to the sum its users need.
        max_map_size: the most the map may grow to on map-full.
        readonly: open without write access.

    Raises:
        StoreError: the path cannot be opened or written (named in the message), or it is open read-only
            in this process and write access is asked.
        StoreFormatError: the store has another format version.
    """
    real = os.path.realpath(os.fspath(path))
    with _registry_lock:
        shared = _registry.get(real)
        if shared is None:
            shared = SharedEnv(real, map_size, max_map_size, readonly)
            _registry[real] = shared
        elif shared.readonly and not readonly:
            raise StoreError(f"disk store {real!r} is already open read-only in this process; "
                             f"close it before opening it for writing")
        shared.refcount += 1
        first = shared.refcount == 1
    if not first:
        shared.max_map_size = max(shared.max_map_size, shared.map_size + max_map_size)
        if not readonly:
            shared.grow(shared.map_size + map_size)
    return shared
