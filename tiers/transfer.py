"""Batched transfers between tiers and between a tier and an engine's own KV memory.

Primitives:
- `KVBuffer`: the protocol an engine adapter implements for its KV memory.
- `Transferer`: executes a request's moves as one batched job on a background worker (and a CUDA
  stream when present), returning a `TransferHandle`:
  - `move(src, dst, keys, src_slots, dst_slots, ...)`: tier to tier, whole blocks (the fastest order)
    or layer-group order; disk reads go straight into the destination slots;
  - `load(keys, src_tiers, src_slots, buffer, dst_blocks, num_groups)`: tiers into the engine's KV in
    layer-group order, so the engine's layer i waits only for the group holding layer i; disk reads
    land straight in the engine's KV when its buffer offers `block_memory`;
  - `save(buffer, src_blocks, keys, dst, dst_slots)`: the engine's KV into a pool tier.
- `slot_runs(...)`: groups slot lists into runs of consecutive slots (one copy per run).

Invariants:
- one copy per run of consecutive slots (per layer group in layer order), issued from one job, never
  one small copy per layer per block; no staging copy on CPU (staging only for CUDA DMA);
- every copy that touches pool memory runs on one FIFO worker in submission order (whatever its
  priority), so a command may reuse a slot freed by an earlier command still queued: the earlier copy
  reads it first. Writes to disk snapshot their source slots on that worker, in order, before the disk
  writer takes them; disk reads run on their own worker by priority (loads before prefetches), each
  after a fence on the copy worker, so they never fill a slot an earlier copy has yet to read;
- a block that fails (a disk miss or a corrupt value) is listed in `handle.failed`, never delivered:
  in a load, layer groups still complete, and the engine recomputes from the first failed block.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from .errors import ConfigError
from .keys import BlockKey
from .pool import PoolTier, check_same_spec, cuda_available
from .spec import KVSpec
from .tier import Tier, TierName
from .worker import PRIORITY_LOAD, TransferHandle, Worker

log = logging.getLogger(__name__)


class KVBuffer(Protocol):
    """An engine's own KV memory as transfers see it; written by an engine adapter.

    What an engine block index means is the engine's business: for transformers, block i of the
    sequence (tokens [i*T, (i+1)*T)); for vLLM, a physical block id of its paged cache.
    Sources and destinations are typed tensors shaped `[n, hi - lo, kv_factor, num_kv_heads,
    block_tokens, head_dim]` (layers [lo, hi) of n blocks in the DESIGN.md layout), usually a view
    of consecutive pool slots, so an adapter can move a run of blocks with one copy per layer.

    Optional: `block_memory(block) -> list[memoryview] | None`, the engine block's bytes as writable
    memory runs in DESIGN.md payload order (CPU memory only). Where an adapter has it, a load reads
    disk blocks straight into the engine's KV (`DiskTier.get_many` into the runs) instead of through
    a host slot and a second copy; the host slot the decision half booked is filled from the engine's
    KV batch by batch, while the rest is read.
    """

    spec: KVSpec

    def write_blocks(self, dst_blocks: Sequence[int], src: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of `len(dst_blocks)` blocks from `src` into the engine's blocks."""

    def read_blocks(self, src_blocks: Sequence[int], dst: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of the engine's blocks `src_blocks` into `dst`."""


class BlockKVBuffer:
    """An engine KV memory made of whole blocks in the DESIGN.md layout: `[num_blocks, *spec.block_shape]`.

    The simplest real `KVBuffer`: replay's `--real` mode and the benchmarks use it as the engine's
    paged KV; an adapter for an engine with another layout implements the protocol itself.
    """

    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device | str = "cpu") -> None:
        if num_blocks <= 0:
            raise ConfigError(f"num_blocks: expected a positive int, got {num_blocks!r}")
        self.spec = spec
        self.data = torch.zeros((num_blocks, *spec.block_shape), dtype=spec.torch_dtype, device=device)

    def write_blocks(self, dst_blocks: Sequence[int], src: torch.Tensor, layers: tuple[int, int]) -> None:
        lo, hi = layers
        for first, b0, _, n in slot_runs(dst_blocks):
            copy_tensor(self.data[b0:b0 + n, lo:hi], src[first:first + n])

    def read_blocks(self, src_blocks: Sequence[int], dst: torch.Tensor, layers: tuple[int, int]) -> None:
        lo, hi = layers
        for first, b0, _, n in slot_runs(src_blocks):
            copy_tensor(dst[first:first + n], self.data[b0:b0 + n, lo:hi])


def slot_runs(src_slots: Sequence[int], dst_slots: Sequence[int] | None = None) -> list[tuple[int, int, int, int]]:
    """Splits parallel slot lists into runs where both advance by one.

    Returns (index of the run's first entry, first src slot, first dst slot, count) per run; with no
    `dst_slots`, only the source must be consecutive (dst = the entry index).
    """
    runs: list[tuple[int, int, int, int]] = []
    dst = dst_slots if dst_slots is not None else range(len(src_slots))
    start = 0
    for i in range(1, len(src_slots) + 1):
        if i == len(src_slots) or src_slots[i] != src_slots[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            runs.append((start, src_slots[start], dst[start], i - start))
            start = i
    return runs


class Transferer:
    """Runs batched copies between the tiers it is given, on background workers.

    Attributes:
        DISK_LOAD_BATCH: disk blocks per batch in a load (each batch is copied into the engine's KV
            while the next is read).

    Args:
        tiers: the tiers by name (any of gpu, host, disk), all of one KVSpec.
    """

    DISK_LOAD_BATCH = 4

    def __init__(self, tiers: Mapping[TierName, Tier]) -> None:
        if not tiers:
            raise ConfigError("Transferer: expected at least one tier")
        self.tiers = {TierName(name): tier for name, tier in tiers.items()}
        specs = list(self.tiers.values())
        for tier in specs[1:]:
            check_same_spec(specs[0].spec, tier.spec, "Transferer")
        self.spec = specs[0].spec
        self._copies = Worker("kvtier-copy")
        self._disk = Worker("kvtier-disk-read") if TierName.DISK in self.tiers else None
        self._stream = torch.cuda.Stream() if cuda_available() else None
        self.fence_timeout_s = 60.0
        self._copier = ParallelCopier(min(os.cpu_count() or 1, 4))
        self._writing: dict[BlockKey, TransferHandle] = {}  # disk writes not yet committed
        self._writing_lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------------

    def _pool(self, name: TierName) -> PoolTier:
        tier = self.tiers.get(TierName(name))
        if not isinstance(tier, PoolTier):
            raise ConfigError(f"tier {name!r}: expected a gpu or host pool among {sorted(map(str, self.tiers))}")
        return tier

    def _on_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    # -- tier to tier ----------------------------------------------------------------------------

    def move(self, src: TierName, dst: TierName, keys: Sequence[BlockKey], src_slots: Sequence[int] = (),
             dst_slots: Sequence[int] = (), *, num_groups: int = 1, priority: int = PRIORITY_LOAD,
             description: str = "") -> TransferHandle:
        """Copies whole blocks from one tier to another.

        Pools are addressed by slot (`src_slots` / `dst_slots`, one per key); the disk by key.
        `num_groups` > 1 copies in layer-group order (group g of every block before group g + 1) and
        completes the handle's layer groups one by one.
        """
        src, dst = TierName(src), TierName(dst)
        keys = tuple(keys)
        groups = self.spec.layer_groups(num_groups)
        handle = TransferHandle(keys, groups, description or f"{src}->{dst} x{len(keys)}")
        if not keys:
            handle.finish()
            return handle
        if src is TierName.DISK:
            return self._disk_worker().submit(lambda: self._read_disk(keys, dst, dst_slots), handle, priority)
        if dst is TierName.DISK:
            return self._write_disk(keys, src, src_slots, handle)
        _check_len(keys, src_slots, "src_slots")
        _check_len(keys, dst_slots, "dst_slots")
        src_pool, dst_pool = self._pool(src).pool, self._pool(dst).pool

        def job() -> None:
            runs = slot_runs(src_slots, dst_slots)
            on_cpu = src_pool.device.type == "cpu" and dst_pool.device.type == "cpu"
            bpb, lb = self.spec.bytes_per_block, self.spec.layer_bytes
            s_base, d_base = src_pool.data.data_ptr(), dst_pool.data.data_ptr()
            with self._on_stream():
                for g, (lo, hi) in enumerate(groups):
                    if on_cpu:  # addresses by arithmetic (no tensor views), one batch over the copier's threads
                        if len(groups) == 1:
                            chunks = [(d_base + d0 * bpb, s_base + s0 * bpb, n * bpb) for _, s0, d0, n in runs]
                        else:
                            off, size = lo * lb, (hi - lo) * lb
                            chunks = [(d_base + (d0 + i) * bpb + off, s_base + (s0 + i) * bpb + off, size)
                                      for _, s0, d0, n in runs for i in range(n)]
                        self._copier.copy(chunks)
                    else:
                        for _, s0, d0, n in runs:
                            if len(groups) == 1:
                                copy_tensor(dst_pool.data[d0:d0 + n], src_pool.data[s0:s0 + n])
                            else:
                                copy_tensor(dst_pool.blocks(d0, n)[:, lo:hi], src_pool.blocks(s0, n)[:, lo:hi])
                    self._sync()
                    handle.group_done(g)

        return self._copies.submit(job, handle, PRIORITY_LOAD)

    def _disk_worker(self) -> Worker:
        if self._disk is None:
            raise ConfigError("no disk tier was given to this Transferer")
        return self._disk

    def _read_disk(self, keys: Sequence[BlockKey], dst: TierName, dst_slots: Sequence[int],
                   on_landed: Callable[[list[int]], None] | None = None) -> list[BlockKey]:
        """Reads blocks from disk into pool slots; returns the keys that missed.

        First waits until copies queued before this read (a demotion snapshotting a slot about to be
        filled) have read their source slots, and until in-flight disk writes of these keys have
        committed. `on_landed(indices)` is called as batches of blocks arrive (see `DiskTier.get_many`).
        """
        _check_len(keys, dst_slots, "dst_slots")
        self._fence(keys)
        disk, pool = self.tiers[TierName.DISK], self._pool(dst).pool
        if pool.device.type == "cpu":
            found = disk.get_many(keys, [pool.block(s) for s in dst_slots], on_landed, self.DISK_LOAD_BATCH)
        else:  # CUDA destination: through one reused pinned staging block
            staging = torch.empty(self.spec.bytes_per_block, dtype=torch.uint8, pin_memory=True)
            found = []
            for i, (key, slot) in enumerate(zip(keys, dst_slots)):
                ok = disk.get(key, staging) is not None
                if ok:
                    pool.block(slot).copy_(staging)
                    if on_landed is not None:
                        on_landed([i])
                found.append(ok)
        return [k for k, ok in zip(keys, found) if not ok]

    def _fence(self, keys: Sequence[BlockKey]) -> None:
        """Waits for the copies queued so far and for in-flight disk writes of `keys` (see `_read_disk`)."""
        self._copies.submit(_no_op).wait(self.fence_timeout_s)
        with self._writing_lock:  # a block whose disk write is still in flight: read it once committed
            writes = {id(h): h for k in keys if (h := self._writing.get(k)) is not None}
        for h in writes.values():
            h.wait(self.fence_timeout_s) if not h.done() else None

    def _write_disk(self, keys: Sequence[BlockKey], src: TierName, src_slots: Sequence[int],
                    handle: TransferHandle) -> TransferHandle:
        _check_len(keys, src_slots, "src_slots")
        pool = self._pool(src).pool
        disk = self.tiers[TierName.DISK]

        def snapshot() -> None:
            try:
                blocks = [pool.block(s).to("cpu", copy=True) for s in src_slots]
                inner = disk.put_async(keys, blocks)
            except BaseException as err:  # reported through the caller's handle
                handle.finish(keys, error=err)
                return
            inner.add_done_callback(lambda h: handle.finish(h.failed, h.error))

        with self._writing_lock:
            for key in keys:
                self._writing[key] = handle
        handle.add_done_callback(self._written)
        self._copies.submit(snapshot, TransferHandle(keys), PRIORITY_LOAD)
        return handle

    def _written(self, handle: TransferHandle) -> None:
        with self._writing_lock:
            for key in handle.keys:
                if self._writing.get(key) is handle:
                    del self._writing[key]

    # -- engine ----------------------------------------------------------------------------------

    def load(self, keys: Sequence[BlockKey], src_tiers: Sequence[TierName], src_slots: Sequence[int],
             buffer: KVBuffer, dst_blocks: Sequence[int], *, num_groups: int = 4,
             priority: int = PRIORITY_LOAD, description: str = "") -> TransferHandle:
        """Copies blocks from pool tiers and disk into the engine's KV, layer group by layer group.

        Disk blocks are read straight into the engine's KV where the buffer offers `block_memory` (each
        batch copied into its host slots while the next is read), otherwise into their host slots
        (each batch copied into the engine's KV while the next is read). Either way the handle ends
        after those copies.

        Args:
            keys: the blocks, in prompt order.
            src_tiers: the tier each block is read from (gpu, host or disk).
            src_slots: each block's slot in its tier; for a disk block, the host slot that receives a
                copy of it (booked by the decision half).
            buffer: the engine's KV memory.
            dst_blocks: the engine's block index for each block.
            num_groups: layer groups; the handle completes them in order.
        """
        keys = tuple(keys)
        for name, values in (("src_tiers", src_tiers), ("src_slots", src_slots), ("dst_blocks", dst_blocks)):
            _check_len(keys, values, name)
        check_same_spec(self.spec, buffer.spec, "load")
        groups = self.spec.layer_groups(min(num_groups, self.spec.num_layers))
        handle = TransferHandle(keys, groups, description or f"load x{len(keys)}")
        if not keys:
            handle.finish()
            return handle
        tiers = [TierName(t) for t in src_tiers]
        disk_idx = [i for i, t in enumerate(tiers) if t is TierName.DISK]

        def copy_groups(failed: set[BlockKey], done: frozenset[int] = frozenset()) -> list[BlockKey]:
            # after a failed block nothing is delivered: the engine recomputes from the first failure;
            # blocks in `done` were already written whole (disk blocks, as their reads landed)
            usable = next((i for i, k in enumerate(keys) if k in failed), len(keys))
            pieces = [p for p in _runs_by_tier(tiers[:usable], src_slots[:usable]) if p[1] not in done]
            with self._on_stream():
                for g, (lo, hi) in enumerate(groups):
                    for tier, first, s0, n in pieces:
                        src = self._pool(tier).pool.blocks(s0, n)[:, lo:hi]
                        buffer.write_blocks(dst_blocks[first:first + n], src, (lo, hi))
                    self._sync()
                    handle.group_done(g)
            return list(keys[usable:])

        if not disk_idx:
            return self._copies.submit(lambda: copy_groups(set()), handle, PRIORITY_LOAD)
        disk_keys = [keys[i] for i in disk_idx]
        memory = _engine_memory(buffer, [dst_blocks[i] for i in disk_idx])
        if memory is not None:
            def fill_host(landed: list[int]) -> None:
                host = self._pool(TierName.HOST).pool
                for first, s0, _, n in slot_runs([src_slots[i] for i in landed]):
                    buffer.read_blocks([dst_blocks[i] for i in landed[first:first + n]], host.blocks(s0, n),
                                       (0, self.spec.num_layers))

            def read_direct() -> None:
                # straight into the engine's KV; each batch is copied into its host slots (the ones the decision
                # half booked) on the copy worker while the next is read (the CPU is idle during the read);
                # then the other tiers' blocks, and the handle ends
                try:
                    self._fence(disk_keys)
                    found = self.tiers[TierName.DISK].get_many(
                        disk_keys, memory, lambda batch: self._copies.submit(
                            lambda: fill_host([disk_idx[j] for j in batch]), TransferHandle(), PRIORITY_LOAD),
                        self.DISK_LOAD_BATCH)
                except BaseException as err:
                    handle.finish(keys, error=err)
                    return
                missed = {k for k, ok in zip(disk_keys, found) if not ok}
                self._copies.submit(lambda: copy_groups(missed, frozenset(disk_idx)), handle, PRIORITY_LOAD)

            self._disk_worker().submit(read_direct, TransferHandle(), priority)
            return handle

        def write_whole(batch: list[int]) -> None:
            with self._on_stream():
                for i in batch:
                    src = self._pool(TierName.HOST).pool.blocks(src_slots[i], 1)
                    buffer.write_blocks(dst_blocks[i:i + 1], src, (0, self.spec.num_layers))

        def read_then_copy() -> None:
            # disk blocks are copied into the engine's KV on the copy worker in batches, as they land, while
            # the rest is read: the copy hides behind the read instead of following it
            try:
                def landed(batch: list[int]) -> None:
                    whole = [disk_idx[j] for j in batch]
                    self._copies.submit(lambda: write_whole(whole), TransferHandle(), PRIORITY_LOAD)

                missed = set(self._read_disk([keys[i] for i in disk_idx], TierName.HOST,
                                             [src_slots[i] for i in disk_idx], landed))
                for i in disk_idx:
                    tiers[i] = TierName.HOST
                self._copies.submit(lambda: copy_groups(missed, frozenset(disk_idx)), handle, PRIORITY_LOAD)
            except BaseException as err:
                handle.finish(keys, error=err)

        self._disk_worker().submit(read_then_copy, TransferHandle(), priority)
        return handle

    def save(self, buffer: KVBuffer, src_blocks: Sequence[int], keys: Sequence[BlockKey], dst: TierName,
             dst_slots: Sequence[int], *, priority: int = PRIORITY_LOAD, description: str = "") -> TransferHandle:
        """Copies the engine's blocks into slots of a pool tier (whole blocks, one copy per layer range run)."""
        keys = tuple(keys)
        _check_len(keys, src_blocks, "src_blocks")
        _check_len(keys, dst_slots, "dst_slots")
        check_same_spec(self.spec, buffer.spec, "save")
        pool = self._pool(dst).pool
        handle = TransferHandle(keys, None, description or f"save x{len(keys)} -> {dst}")

        def job() -> None:
            with self._on_stream():
                for first, d0, _, n in slot_runs(dst_slots):
                    buffer.read_blocks(src_blocks[first:first + n], pool.blocks(d0, n), (0, self.spec.num_layers))
                self._sync()

        return self._copies.submit(job, handle, PRIORITY_LOAD)

    def drain(self, timeout_s: float = 60.0) -> None:
        """Waits until every job queued so far on the copy and disk workers has run."""
        self._copies.submit(_no_op).wait(timeout_s)
        if self._disk is not None:
            self._disk.submit(_no_op).wait(timeout_s)

    def close(self) -> None:
        """Finishes queued jobs and joins the workers (idempotent)."""
        if self._disk is not None:
            self._disk.close()
        self._copies.close()
        self._copier.close()


#: memmove copies runs in pieces of at most this many bytes: glibc's memmove takes `rep movsb` below the
#: L2 size on AMD CPUs and a vector loop above it; on this machine's EPYC (1 MiB L2) two threads copying
#: 512 KiB pieces reached 1.01x of one 512 MiB `copy_`, 1 MiB and larger pieces 0.87-0.91x
MEMMOVE_PIECE_BYTES = 512 << 10

_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def memory_chunks(dst: torch.Tensor, src: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(dst address, src address, bytes) of the contiguous runs of a CPU copy, or None when the views
    are not made of contiguous rows along their first dimension (then numpy copies them)."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ConfigError(f"copy: shapes/dtypes differ: {tuple(dst.shape)} {dst.dtype} vs {tuple(src.shape)} {src.dtype}")
    if dst.is_contiguous() and src.is_contiguous():
        return [(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())]
    if dst.dim() > 1 and dst[0].is_contiguous() and src[0].is_contiguous():
        nbytes = dst[0].numel() * dst.element_size()
        d_step, s_step = dst.stride(0) * dst.element_size(), src.stride(0) * src.element_size()
        d_ptr, s_ptr = dst.data_ptr(), src.data_ptr()
        return [(d_ptr + i * d_step, s_ptr + i * s_step, nbytes) for i in range(dst.shape[0])]
    return None


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copies `src` into `dst` (same shape and dtype), single-threaded on CPU.

    Between CPU tensors: one `memmove` per contiguous run (one per block for a slice of consecutive
    blocks), or numpy's strided copy for other views; both release the GIL and use one thread, so a
    copy overlapped with the model's own threads does not fight them for a parallel region (each
    `copy_` is one, whose barrier stalls whenever a thread is descheduled: `copy_` per 2 MiB block fell
    to 0.08-0.65x of one large copy on a busy 2-core machine). A device copy goes through `copy_`
    (asynchronous on the current stream).
    """
    if dst.device.type != "cpu" or src.device.type != "cpu":
        dst.copy_(src, non_blocking=True)
        return
    chunks = memory_chunks(dst, src)
    if chunks is None:
        as_int = getattr(torch, _INT_OF_SIZE[dst.element_size()])
        np.copyto(dst.view(as_int).numpy(), src.view(as_int).numpy())
        return
    _memmove_all(chunks)


class ParallelCopier:
    """Copies a batch of memory runs on `num_threads` threads (this one included).

    Tier-to-tier moves are pure memory bandwidth: one thread reached 0.6-0.7x of a 2-thread `copy_`
    of the same bytes on a quiet 2-core machine. The batch is cut into pieces of at most `PIECE_BYTES`
    that the threads take in turn from a shared counter, each with `memmove` (which releases the
    GIL): a thread the OS deschedules for a while leaves its share to the others instead of holding
    up the batch, as a fixed split by bytes does. Owned by a `Transferer`; `close()` joins the threads.
    """

    #: below this many bytes a batch is copied on the calling thread alone
    MIN_PARALLEL_BYTES = 4 << 20
    #: the most bytes one thread copies before taking the next piece (`MEMMOVE_PIECE_BYTES`)
    PIECE_BYTES = MEMMOVE_PIECE_BYTES

    def __init__(self, num_threads: int) -> None:
        self.num_threads = max(1, num_threads)
        self._pool = ThreadPoolExecutor(self.num_threads - 1, "kvtier-copy-helper") if self.num_threads > 1 else None

    def copy(self, chunks: Sequence[tuple[int, int, int]]) -> None:
        """Copies every (dst address, src address, bytes) run; the runs must not overlap each other.

        Runs are copied in source-address order: scattered slots read in address order measured
        0.95x of one large copy here, in slot-list order 0.83x.
        """
        chunks = sorted(chunks, key=lambda c: c[1])
        total = sum(n for _, _, n in chunks)
        if self._pool is None or total < self.MIN_PARALLEL_BYTES:
            _memmove_all(chunks)
            return
        step = self.PIECE_BYTES
        pieces = [(d + o, s + o, min(step, n - o)) for d, s, n in chunks for o in range(0, n, step)]
        taken = itertools.count()  # next() on a count is atomic under the GIL

        def work() -> None:
            for i in iter(taken.__next__, None):
                if i >= len(pieces):
                    return
                d, s, n = pieces[i]
                ctypes.memmove(d, s, n)

        futures = [self._pool.submit(work) for _ in range(self.num_threads - 1)]
        work()
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _memmove_all(chunks: Sequence[tuple[int, int, int]]) -> None:
    step = MEMMOVE_PIECE_BYTES
    for d, s, n in chunks:
        for o in range(0, n, step):
            ctypes.memmove(d + o, s + o, min(step, n - o))


def _engine_memory(buffer: KVBuffer, blocks: Sequence[int]) -> list[list[memoryview]] | None:
    """The memory runs of `blocks` in an engine's KV (`KVBuffer.block_memory`), or None unless the
    buffer offers them for every block."""
    block_memory = getattr(buffer, "block_memory", None)
    if block_memory is None:
        return None
    memory = []
    for block in blocks:
        runs = block_memory(block)
        if runs is None:
            return None
        memory.append(runs)
    return memory


def _runs_by_tier(tiers: Sequence[TierName], slots: Sequence[int]) -> list[tuple[TierName, int, int, int]]:
    """(tier, index of first entry, first slot, count) for runs of consecutive slots in one tier."""
    runs: list[tuple[TierName, int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or tiers[i] is not tiers[start] or slots[i] != slots[i - 1] + 1:
            runs.append((tiers[start], start, slots[start], i - start))
            start = i
    return runs


def _no_op() -> None:
    return None


def _check_len(keys: Sequence[object], values: Sequence[object], name: str) -> None:
    if len(values) != len(keys):
        raise ConfigError(f"{name}: expected one per key ({len(keys)}), got {len(values)}")


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
