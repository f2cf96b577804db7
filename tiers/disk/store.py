"""The `disk` tier: whole blocks in an LMDB store, checked on every read, durable once acknowledged.

Primitives:
- `DiskTier(path, spec, capacity_bytes, ...)`: a `Tier` over an LMDB environment (shared by every
  `DiskTier` on the same path in this process, see `disk.env`); one named sub-database holds the blocks of
  every model under the key `spec.fingerprint_bytes + block key`, so a lookup of another model never
  finds them, and a small index sub-database holds the same keys with each value's length, written in the
  same transaction, so `keys()` (a prefix scan), `contains` and a put's overwrite check never read a
  block's pages (py-lmdb faults in every page of a value it returns, and positioning a cursor on a block
  touches its first page).
- reads: `get(key, out)` / `get_many(keys, outs)` locate the values through the B-tree
  (`SharedEnv.locate_many`, no value page touched), then read them in file order with `os.preadv`, a few
  contiguous ranges in parallel (`disk.readers`), straight into `out` (a CPU buffer of one block, or an
  engine's memory runs), checking header and checksum; zstd payloads are decompressed into `out`.
- writes: `put` (one synchronous committed transaction) and `put_async(keys, blocks, on_commit)`: queued
  for the tier's background writer (`DiskWriter`), which puts up to `batch_max_blocks` blocks in one write
  transaction; the handle completes only after that transaction committed.
- `delete`, `contains`, `keys`, `num_used`, `flush`, `close`, `stats()` -> `DiskStats`, `data_file`,
  `reopen()` (close, then a new tier with the same arguments: what cold-cache benchmarks do).

Invariants:
- never wrong bytes: a value whose header (magic, version, fingerprint, key, lengths) or checksum does not
  match is a miss, counted (`corrupt` or `foreign`) and removed; on a miss `out`'s contents are undefined;
- acknowledged means durable: a save is reported (handle, `on_commit`, `acknowledged_blocks`) only after
  its LMDB transaction committed, with LMDB's durable defaults;
- this spec's block count (kept transactionally in the meta db, so it holds across processes) never
  exceeds `num_slots`: a put of a new key into a full tier raises `CapacityError` (the scheduler evicts);
- map full grows the map up to `max_map_size`, then raises `StoreFullError`; so does ENOSPC.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Sequence

import lmdb
import numpy as np
import torch

from kvtier.tiers.disk import env as diskenv
from kvtier.tiers.codecs import Codec, get_codec
from kvtier.tiers.disk.format import HEADER_BYTES, encode_value
from kvtier.tiers.disk.books import SpecBooks
from kvtier.tiers.disk.read import PartedValue, check_value, destination, part_bounds, read_value_at
from kvtier.tiers.disk.readers import DEFAULT_READ_THREADS, MIN_PART_BYTES, Batches, ReaderPool
from kvtier.tiers.disk.stats import PAGE_BYTES, DiskStats, default_map_size, store_error
from kvtier.tiers.disk.writer import DiskWriter
from kvtier.tiers.errors import CapacityError, ClosedError, ConfigError, StoreError, StoreFullError
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import Tier, TierName, format_size, parse_size
from kvtier.tiers.worker import TransferHandle

log = logging.getLogger(__name__)


class DiskTier(Tier):
    """Blocks of one KVSpec in an LMDB store (see the module docstring)."""

    name = TierName.DISK

    def __init__(self, path: str | os.PathLike[str], spec: KVSpec, capacity_bytes: int | str, *,
                 codec: Codec | str = Codec.NONE, zstd_level: int = 1, map_size: int | str | None = None,
                 max_map_size: int | str | None = None, batch_max_blocks: int = 64, readonly: bool = False,
                 read_threads: int = DEFAULT_READ_THREADS, read_split_bytes: int = MIN_PART_BYTES,
                 uncached_reads: bool = True) -> None:
        """Opens (or creates) the store at `path` for `spec`'s blocks.

        Args:
            path: the store's directory (created when missing).
            spec: the KV geometry and model identity of the blocks.
            capacity_bytes: the most raw block bytes of this spec kept (num_slots = capacity // block).
            codec: how payloads are written (reads follow each value's header).
            zstd_level: zstd level of the zstd codecs. 1 by default: on bf16 KV (real SmolLM2 KV, Gaussian llama-3-8b
                blocks) it compressed better with shuffle (1.44-1.46x against 1.40x) and twice as fast as level 3.
            map_size: initial LMDB map size; default `default_map_size(num_slots, bytes_per_block)`.
            max_map_size: the map grows on map-full up to this (default 8 x map_size; map_size: no growth).
            batch_max_blocks: most blocks per write transaction of the background writer.
            readonly: open without write access (puts raise StoreError; corrupt values are not removed).
            read_threads / read_split_bytes: a `get_many` is cut into up to `read_threads` contiguous ranges of
                the file of at least `read_split_bytes` each, read at once (see `disk.readers`; 1: one stream).
            uncached_reads: those ranges are read around the page cache (O_DIRECT) when their bytes are not in
                it and the file system allows it (`disk.uncached`).

        Raises:
            ConfigError: capacity below one block, bad codec, level, batch size or sizes.
            StoreError: the path cannot be opened or written (named in the message).
            StoreFormatError: the store has another format version.
        """
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # for reopen()
        super().__init__(spec, capacity_bytes)
        self.codec = get_codec(codec, zstd_level)
        if not isinstance(batch_max_blocks, int) or batch_max_blocks < 1:
            raise ConfigError(f"batch_max_blocks: expected a positive int, got {batch_max_blocks!r}")
        size = parse_size(map_size, "map_size") if map_size is not None else \
            default_map_size(self.num_slots, spec.bytes_per_block)
        max_size = parse_size(max_map_size, "max_map_size") if max_map_size is not None else 8 * size
        if max_size < size:
            raise ConfigError(f"max_map_size: {format_size(max_size)} is below map_size {format_size(size)}")
        self.path = os.fspath(path)
        self.readonly = readonly
        self._fp = spec.fingerprint_bytes
        self._stats_lock = threading.Lock()
        self._n = dict(hits=0, misses=0, corrupt=0, foreign=0, acknowledged_blocks=0, bytes_read=0, bytes_written=0)
        self._closed = False
        self._final_stats = DiskStats(0, 0, 0, 0, 0, 0, 0, 0, 0)
        self._readers = ReaderPool(read_threads, read_split_bytes, uncached_reads)  # checked before the store opens
        self._env = diskenv.acquire(self.path, size, max_size, readonly)
        self._books = SpecBooks(self._env, self._fp)
        self._writer = DiskWriter(self, batch_max_blocks)

    # -- bookkeeping -----------------------------------------------------------------------------------

    def record(self, **deltas: int) -> None:
        """Adds to the counters `stats()` reports (the background writer counts acknowledged blocks)."""
        with self._stats_lock:
            for name, delta in deltas.items():
                self._n[name] += delta

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"disk tier on {self.path!r} is closed")

    @property
    def data_file(self) -> str:
        """Path of the LMDB data file (data.mdb), e.g. to evict it from the page cache."""
        return self.data_file_of(self._env.path)

    @staticmethod
    def data_file_of(path: str | os.PathLike[str]) -> str:
        """Path of the LMDB data file of the store at `path` (no store needs to be open)."""
        return os.path.join(os.path.realpath(os.fspath(path)), "data.mdb")

    @property
    def num_used(self) -> int:
        self._check_open()
        with self._env.txn() as txn:
            return self._books.counters(txn)[0]

    def stats(self) -> DiskStats:
        """A snapshot of the counters (the last one taken at `close()` once closed)."""
        if self._closed:
            return self._final_stats
        with self._env.txn() as txn:
            count, stored = self._books.counters(txn)
        with self._stats_lock:
            return DiskStats(stored_bytes=stored, num_blocks=count, **self._n)

    def describe(self) -> dict[str, Any]:
        """Capacity, codec and place, for reports."""
        return {"tier": str(self.name), "path": self.path, "codec": self.codec.codec.label,
                "num_slots": self.num_slots, "capacity_bytes": self.capacity_bytes, "map_size": self._env.map_size}

    # -- writes ----------------------------------------------------------------------------------------

    def write_batch(self, items: Sequence[tuple[BlockKey, np.ndarray]]) -> tuple[list[BlockKey], list[BlockKey]]:
        """Puts blocks in one committed write transaction (growing the map on map-full).

        Returns:
            (committed keys, keys left out because this spec's blocks fill the capacity).

        Raises:
            StoreFullError: the map cannot grow further, or the file system is full.
            StoreError: another LMDB failure.
        """
        env = self._env
        while True:
            try:
                with env.txn(write=True) as txn:
                    count, stored = self._books.counters(txn)
                    done, full, written = [], [], 0
                    for key, flat in items:
                        lk = self._books.lmdb_key(key)
                        old_len = self._books.stored_len(txn, lk)
                        if old_len is None and count >= self.num_slots:
                            full.append(key)
                            continue
                        value = encode_value(self.codec, self._fp, key, flat, self.spec.itemsize)
                        txn.put(lk, value, db=env.blocks_db)
                        self._books.index(txn, lk, len(value))
                        count += old_len is None
                        stored += len(value) - HEADER_BYTES - (old_len - HEADER_BYTES if old_len is not None else 0)
                        written += len(value)
                        done.append(key)
                    self._books.set_counters(txn, count, stored)
                self.record(bytes_written=written)
                return done, full
            except lmdb.MapFullError as err:
                need = env.map_size + sum(HEADER_BYTES + f.size + PAGE_BYTES for _, f in items)
                if not env.grow(need):
                    raise StoreFullError(
                        f"disk store {self.path!r}: LMDB map full at {format_size(env.map_size)} and max_map_size "
                        f"{format_size(env.max_map_size)} reached; raise max_map_size or lower the capacity") from err
            except lmdb.Error as err:
                raise store_error(self.path, "write", err, sum(f.size for _, f in items)) from err

    def _flats(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor], what: str) -> list[np.ndarray]:
        if len(keys) != len(blocks):
            raise ConfigError(f"{what}: {len(keys)} keys but {len(blocks)} blocks")
        for key in keys:
            self._books.lmdb_key(key)
        return [self.check_block(b.cpu() if b.device.type != "cpu" else b, f"{what} block").numpy()
                for b in blocks]

    def put(self, key: BlockKey, block: torch.Tensor) -> None:
        """Stores one block in its own committed transaction (durable on return).

        Raises:
            CapacityError: the tier is full.
            SpecMismatchError: the block has the wrong size.
            StoreFullError / StoreError: the store cannot take it.
        """
        self.put_many([key], [block])

    def put_many(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """Stores blocks in committed transactions of up to `batch_max_blocks` (durable on return).

        Blocks that fit are committed even when others do not.

        Raises:
            CapacityError: some blocks did not fit (named by count); the others are stored.
        """
        self._check_open()
        flats = self._flats(keys, blocks, "put")
        step, left_out = self._writer.batch_max_blocks, 0
        for i in range(0, len(flats), step):
            done, full = self.write_batch(list(zip(keys[i:i + step], flats[i:i + step])))
            self.record(acknowledged_blocks=len(done))
            left_out += len(full)
        if left_out:
            raise CapacityError(f"disk tier is full ({self.num_slots} blocks of {self.spec.model_id}); "
                                f"{left_out} of {len(keys)} blocks not stored")

    def put_async(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor],
                  on_commit: Callable[[list[BlockKey]], None] | None = None) -> TransferHandle:
        """Queues blocks for the background writer; returns at once.

        The blocks' memory must stay unchanged until the handle completes. The handle completes only after
        the transaction(s) holding the blocks committed; its `failed` lists blocks that were not stored
        (tier full), its `error` a store failure. `on_commit(keys)` is called with the committed keys.
        """
        self._check_open()
        flats = self._flats(keys, blocks, "put_async")
        return self._writer.submit(list(keys), flats, on_commit)

    def flush(self, timeout: float | None = 60.0) -> None:
        """Waits until every queued save is committed (or failed).

        Raises:
            TransferTimeout: not done within `timeout` seconds.
        """
        self._writer.flush(timeout)

    def delete(self, key: BlockKey) -> bool:
        self._check_open()
        try:
            with self._env.txn(write=True) as txn:
                return self._books.drop(txn, self._books.lmdb_key(key))
        except lmdb.Error as err:
            raise store_error(self.path, "delete", err) from err

    # -- reads -----------------------------------------------------------------------------------------

    def contains(self, key: BlockKey) -> bool:
        self._check_open()
        with self._env.txn() as txn:
            return txn.get(self._books.lmdb_key(key), db=self._env.index_db) is not None

    def keys(self) -> list[BlockKey]:
        """This spec's keys, by a prefix scan of the index (no block page is read)."""
        self._check_open()
        with self._env.txn() as txn:
            return self._books.keys(txn)

    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Reads one block into `out` (a new uint8 tensor when None); None on a miss."""
        target = out if out is not None else torch.empty(self.spec.bytes_per_block, dtype=torch.uint8)
        return target if self.get_many([key], [target])[0] else None

    def get_many(self, keys: Sequence[BlockKey], outs: Sequence[torch.Tensor | Sequence[memoryview]],
                 on_landed: Callable[[list[int]], None] | None = None, batch_blocks: int = 4,
                 layer_groups: Sequence[tuple[int, int]] | None = None, on_group: Callable[[int], None] | None = None,
                 on_part: Callable[[int, list[int]], None] | None = None) -> list[bool]:
        """Reads blocks straight into `outs`: contiguous CPU tensors of one block each, or per block a list
        of writable memory runs that take its payload in order (an engine's own KV memory).

        Values are read in file order with `preadv` at their located offsets, a large read cut into a few
        contiguous ranges read by the tier's reader threads (`disk.readers`; around the page cache when their
        bytes are out of it, `disk.uncached`). `on_landed(indices)`, when given, is called on the calling
        thread with the indices (into `keys`) of delivered blocks in batches of `batch_blocks` as they land,
        so a caller can use them while the rest is read.

        With `layer_groups` (contiguous [lo, hi) layer ranges from 0 to num_layers) every value is read group by
        group, group g of every block before group g + 1 (`disk.read.PartedValue`): `on_part(g, indices)` (not
        `on_landed`) gets the blocks whose group g landed, in batches, then `on_group(g)` is called once group g
        of every block is in `outs`, both before the checksums are decided (with the last group): whoever
        computes from a group early must drop that work for a block reported missing (a miss, not read again
        through LMDB); the few values LMDB cannot locate are read whole first.

        Returns:
            which blocks were delivered; a miss (absent, corrupt, foreign) leaves its `out` undefined.

        Raises:
            ConfigError: an output is not on the CPU, `outs` and `keys` differ in length, or `layer_groups`
                do not cover the layers in order.
            SpecMismatchError: an output does not hold exactly one block.
        """
        self._check_open()
        if len(keys) != len(outs):
            raise ConfigError(f"get_many: {len(keys)} keys but {len(outs)} outputs")
        bounds = part_bounds(self.spec, layer_groups)
        dsts = [destination(self.spec, out) for out in outs]
        found, bad = [False] * len(keys), []
        env, itemsize = self._env, self.spec.itemsize
        # landed blocks in batches: a layered read's groups to `on_part`, whole values to `on_landed` (one part)
        pieces = Batches(len(bounds) - 1, batch_blocks, on_part, on_group) if bounds else Batches(
            1, batch_blocks, None if on_landed is None else lambda _, batch: on_landed(batch), None)

        def deliver(i: int, reason: str | None, length: int, whole: bool = not bounds) -> None:
            self.record(bytes_read=length)
            found[i] = reason is None
            if reason is not None:
                bad.append((keys[i], reason))
            elif whole:  # in every group (a layered read reports its parts as they land)
                for g in range(pieces.num_groups):
                    pieces.piece(g, i)

        with env.txn() as txn:
            located, through_map = [], []
            for i, where in enumerate(env.locate_many(txn, [self._books.lmdb_key(k) for k in keys])):
                if isinstance(where, tuple):
                    located.append((*where, i))
                elif where is not None:
                    through_map.append(i)
            located.sort()

            def from_map(indices: list[int]) -> None:  # LMDB's own read of the value decides
                for i in indices:
                    view = txn.get(self._books.lmdb_key(keys[i]), db=env.blocks_db)
                    if view is not None:
                        deliver(i, check_value(view, self._fp, keys[i], dsts[i], itemsize), len(view), True)

            if bounds:
                from_map(through_map)
                parted = {i: PartedValue(offset, n, self._fp, keys[i], dsts[i], itemsize, bounds)
                          for offset, n, i in located}
                self._readers.read(env.data_file, env.fd, located, lambda fd, o, n, i, part: parted[i].read(fd, part),
                                   deliver, len(bounds) - 1, pieces.group, lambda i, part: parted[i].extent(part),
                                   pieces.piece if on_part is not None else None)
            else:
                retry: list[int] = []
                self._readers.read(env.data_file, env.fd, located, lambda fd, o, n, i, part: read_value_at(
                    fd, o, n, self._fp, keys[i], dsts[i], itemsize), lambda i, reason, n: (
                    retry.append(i) if reason is not None else deliver(i, None, n)))  # bad or misplaced
                from_map(through_map + retry)
                pieces.group(0)
        hits = sum(found)
        self.record(hits=hits, misses=len(keys) - hits, corrupt=sum(r == "corrupt" for _, r in bad),
                    foreign=sum(r == "foreign" for _, r in bad))
        if bad:
            self._remove_bad([k for k, _ in bad])
        return found

    def _remove_bad(self, keys: list[bytes]) -> None:
        """Deletes values that failed their checks, if they still fail (another writer may have replaced them)."""
        if self.readonly:
            return
        out = np.empty(self.spec.bytes_per_block, dtype=np.uint8)
        try:
            with self._env.txn(write=True) as txn:
                for key in keys:
                    view = txn.get(self._books.lmdb_key(key), db=self._env.blocks_db)
                    if view is None or check_value(view, self._fp, key, out, self.spec.itemsize) is None:
                        continue
                    self._books.drop(txn, self._books.lmdb_key(key))
                    log.warning("disk store %s: removed a bad value for block %s", self.path, key.hex()[:8])
        except (lmdb.Error, StoreError) as err:  # cleanup is best effort: the block was already a miss
            log.warning("disk store %s: could not remove %d bad values: %s", self.path, len(keys), err)

    # -- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Commits queued saves, joins the writer, the worker and the readers, and releases the store (idempotent)."""
        if self._closed:
            return
        try:
            self._writer.close()
            super().close()
            self._final_stats = self.stats()
        finally:
            self._closed = True
            self._readers.close()  # joined before the descriptor they read goes
            self._env.release()

    def reopen(self) -> "DiskTier":
        """Closes this tier and opens a new one with the same arguments (after a cold-cache eviction, say)."""
        self.close()
        return DiskTier(**self._args)
