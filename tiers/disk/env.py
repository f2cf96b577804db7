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
- `SharedEnv.locate_many(txn, lmdb_keys)` -> per key (file offset, length) of its value in data.mdb,
  `None` when absent, or `UNLOCATED` when it cannot be located without reading it (then the caller reads
  it through LMDB). Why: py-lmdb touches every page of a value it returns ("preload"), and even
  `cursor.set_key` reads a value's first page; a value page cached ahead of a cold read stops the
  kernel's readahead (the reads then ran at 0.6-0.8x of a sequential read here). So the lookup walks
  `blocks_db`'s B-tree itself, from the root in its MDB_db record, through branch and leaf pages in the
  map (LMDB 0.9 layout: 16-byte page header, u16 node offsets, nodes of u16 lo, u16 hi, u16 flags, u16
  ksize, key, then a branch's child page number in lo|hi|flags or a big value's overflow page number),
  checking every page it parses (the map's address comes from /proc/self/maps: LMDB's `map_addr` is 0
  without MDB_FIXEDMAP). `DiskTier`'s reads go through it.
- `SharedEnv.fd`: a read-only descriptor of data.mdb for `os.preadv` (its own file readahead state,
  advised sequential).

Invariants: the env is opened with LMDB's durable defaults (sync, metasync, lock, no writemap), so every
committed write transaction survives a SIGKILL or a power cut; a store whose meta records another
format version is never opened (`StoreFormatError`). The map is opened without readahead
(`MADV_RANDOM`): lookups fault in single B-tree pages, and values are read with `os.preadv` in file order
(`disk.read.read_value_at`) from `SharedEnv.fd`, whose own readahead then streams them. Measured on this
project's machine (virtio disk with an 8 MiB readahead window, 94 MB of values, cold): each fault in a
map with readahead read 8 MiB around it synchronously, and reading values through the map ran at
0.35-0.6 of a cold sequential read, with preads in file order at 0.9-1.0. A value read through the map
(the rare fallback when `locate_many` fails) is faulted in page by page. A located offset is only a hint to
a caller reading at it: the value's header and checksum decide.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import logging
import os
import struct
import threading
from typing import Iterator, Sequence

import lmdb

from kvtier.tiers.disk.format import STORE_FORMAT_VERSION
from kvtier.tiers.errors import StoreError, StoreFormatError
from kvtier.tiers.tier import format_size

log = logging.getLogger(__name__)

BLOCKS_DB = b"kvtier-blocks"
META_DB = b"kvtier-meta"
#: fingerprint + key -> stored value length (u64), written in the same transaction as the block: listing,
#: membership and overwrite checks read this small B-tree, never a block's pages
INDEX_DB = b"kvtier-index"
VERSION_KEY = b"format_version"
_WAIT_S = 60.0
#: `locate_many` could not find a value's place without reading it
UNLOCATED = "unlocated"
_NODE = struct.Struct("<HHHH")  # LMDB 0.9 MDB_node header (little-endian): lo, hi, flags, ksize
_PAGE_HEADER = struct.Struct("<QHHHH")  # MDB_page header: pgno, pad, flags, lower, upper (16 bytes)
_DB = struct.Struct("<IHHQQQQQ")  # MDB_db record: pad, flags, depth, branch, leaf, overflow pages, entries, root
_P_BRANCH, _P_LEAF = 0x01, 0x02
_P_DIRTY_OR_KEEP = 0x10 | 0x8000  # P_DIRTY, P_KEEP: bookkeeping bits a committed page may carry
_PGNO = struct.Struct("<Q")
_F_BIGDATA = 0x01
_PAGE_HEADER_BYTES = 16  # MDB_page header on 64-bit builds: the payload of an overflow page starts after it

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

    def locate_many(self, txn: lmdb.Transaction, lks: Sequence[bytes]) -> list[tuple[int, int] | str | None]:
        """Where the values of `lks` lie in data.mdb, found by walking `blocks_db`'s B-tree in the map
        without touching any value (see the module docstring).

        Args:
            txn: an open transaction (the offsets are valid while it is open).
            lks: LMDB keys.

        Returns:
            per key: (file offset, length); None when the key is absent; `UNLOCATED` when the tree does not
            look as expected or the value is stored inline (the caller then reads it through LMDB).
        """
        record = txn.get(BLOCKS_DB)  # the sub-database's MDB_db record in the main database
        if record is None or len(record) != _DB.size:
            return [UNLOCATED] * len(lks)
        _, _, depth, _, _, _, entries, root = _DB.unpack(bytes(record))
        if entries == 0:
            return [None] * len(lks)
        pages: dict[int, tuple[int, list[tuple[bytes, int, int, int]]] | None] = {}
        return [self._find(root, depth, lk, pages) for lk in lks]

    def _find(self, pgno: int, depth: int, lk: bytes,
              pages: dict[int, tuple[int, list[tuple[bytes, int, int, int]]] | None]) -> tuple[int, int] | str | None:
        """Descends from page `pgno` to `lk`'s leaf node (`depth` levels at most)."""
        for _ in range(max(depth, 1)):
            if pgno not in pages:
                pages[pgno] = self._page_nodes(pgno)
            parsed = pages[pgno]
            if parsed is None:
                return UNLOCATED
            flags, nodes = parsed
            keys = [n[0] for n in nodes]
            if flags & _P_BRANCH:  # the child holding the last key <= lk (node 0's key is empty: below all)
                i = max(bisect.bisect_right(keys, lk, 1) - 1, 0)
                pgno = nodes[i][1]
                continue
            i = bisect.bisect_left(keys, lk)
            if i == len(keys) or keys[i] != lk:
                return None
            _, value_pgno, size, node_flags = nodes[i]
            if not node_flags & _F_BIGDATA:
                return UNLOCATED
            offset = value_pgno * self.page_size + _PAGE_HEADER_BYTES
            return (offset, size) if offset + size <= os.fstat(self.fd).st_size else UNLOCATED
        return UNLOCATED

    def _page_nodes(self, pgno: int) -> tuple[int, list[tuple[bytes, int, int, int]]] | None:
        """A branch or leaf page's nodes as (key, page number, data size, node flags), or None when the page
        is not in the map or not a plain branch/leaf page (LMDB 0.9 layout: 16-byte header, u16 offsets of
        the nodes, each node u16 lo, u16 hi, u16 flags, u16 key size, key, then a branch node's child in
        lo|hi|flags or a big leaf value's overflow page number)."""
        size = self.page_size
        if (pgno + 1) * size > os.fstat(self.fd).st_size:  # past the file's end the map is not backed (SIGBUS)
            return None
        addr = self._mapped(pgno * size, size)
        if addr is None:
            return None
        page = ctypes.string_at(addr, size)
        _, _, flags, lower, upper = _PAGE_HEADER.unpack_from(page)
        branch, leaf = bool(flags & _P_BRANCH), bool(flags & _P_LEAF)
        if flags & ~(_P_BRANCH | _P_LEAF | _P_DIRTY_OR_KEEP) or branch == leaf \
                or not _PAGE_HEADER.size <= lower <= upper <= size:
            return None
        nodes = []
        for off in struct.unpack_from(f"<{(lower - _PAGE_HEADER.size) // 2}H", page, _PAGE_HEADER.size):
            if not upper <= off <= size - _NODE.size:
                return None
            lo, hi, node_flags, ksize = _NODE.unpack_from(page, off)
            key = page[off + _NODE.size:off + _NODE.size + ksize]
            if branch:
                nodes.append((key, lo | hi << 16 | node_flags << 32, 0, 0))
            elif node_flags & _F_BIGDATA:
                nodes.append((key, _PGNO.unpack_from(page, off + _NODE.size + ksize)[0], lo | hi << 16, node_flags))
            else:
                nodes.append((key, 0, lo | hi << 16, node_flags))
        return flags, nodes

    def _mapped(self, file_offset: int, size: int) -> int | None:
        """The address of data.mdb's bytes [file_offset, file_offset + size) in LMDB's map, or None unless
        all of them lie in it."""
        for lo, hi, pgoff in self._ranges():
            addr = lo + file_offset - pgoff
            if lo <= addr and addr + size <= hi:
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


def open_paths() -> list[str]:
    """The directories of the stores open in this process (cold-cache checks refuse to evict them)."""
    with _registry_lock:
        return list(_registry)
