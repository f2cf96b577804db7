"""Batched transfers between tiers and between a tier and an engine's own KV memory.

Primitives:
- `KVBuffer` (in `kvbuffer`): the protocol an engine adapter implements for its KV memory.
- `Transferer`: executes a request's moves as one batched job on a background worker (and a CUDA
  stream when present), returning a `TransferHandle`:
  - `move(...)`: tier to tier, whole blocks or layer-group order; disk reads straight into the slots (a
    background one in pieces behind loads, `cancel` drops the pieces not started: `pieces`);
  - `load(..., wait_for)`: tiers into the engine's KV in layer-group order (layer i waits only for its
    group; disk reads land in host slots placed for them, `pool.HostTier`), once the moves it joined
    (`wait_for`) have completed;
  - `save(buffer, src_blocks, keys, dst, dst_slots)`: the engine's KV into a pool tier.

Invariants:
- one copy per run of consecutive slots (per layer group in layer order), issued from one job, never
  one small copy per layer per block; no staging copy on CPU (staging only for CUDA DMA);
- every copy that touches pool memory runs on one FIFO worker in submission order (whatever its
  priority), so a command may reuse a slot freed by an earlier command still queued: the earlier copy
  reads it first. Writes to disk snapshot their source slots on that worker, in order, before the disk
  writer takes them; disk reads run on their own worker by priority (loads before prefetches), each
  after a fence on the copy worker, so they never fill a slot an earlier copy has yet to read;
- a block that fails (a disk miss or a corrupt value) is listed in `handle.failed`: in a load, layer
  groups still complete, and the engine recomputes from the first failed block (a layer-by-layer disk
  load completes groups before the checksums are decided: the engine drops a pass that had a failed
  block, never keeps KV computed from it);
- on CUDA, a job's copies run on the transfer stream after everything queued on the submitting
  thread's stream before the submission (an event, `_submitted`), and a layer group is reported done
  only after the stream has finished its copies.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from typing import Callable, Mapping, Sequence

import torch

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.pool import PoolTier, check_same_spec, cuda_available
from kvtier.tiers.tier import OUTSIDE, Tier, TierName, get_outside
from kvtier.tiers.pieces import PieceReads, failed_of, when_done
from kvtier.tiers.worker import PRIORITY_LOAD, TransferHandle, Worker
from kvtier.tiers.copies import ParallelCopier, copy_slot_runs, one_torch_thread
from kvtier.tiers.kvbuffer import KVBuffer, runs_by_tier, slot_runs, write_pieces


class Transferer:
    """Runs batched copies between the tiers it is given, on background workers.

    Attributes:
        DISK_LOAD_BATCH: disk blocks per batch of a read into host slots (copied on while the next is read).

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
        self._stream = torch.cuda.Stream() if cuda_available() else None
        # without CUDA its threads run torch serially (`one_torch_thread`: the copier's fast path); with CUDA
        # their device copies may stage non-contiguous views on the CPU, over torch's threads
        serial = one_torch_thread if self._stream is None else None
        self._copies = Worker("kvtier-copy", serial)
        self._disk = Worker("kvtier-disk-read", serial) if any(t in self.tiers for t in OUTSIDE) else None
        self.fence_timeout_s = 60.0
        self._copier = ParallelCopier(min(os.cpu_count() or 1, 4))
        self._writing: dict[BlockKey, TransferHandle] = {}  # disk writes not yet committed
        self._writing_lock = threading.Lock()
        self._pieces = PieceReads()  # background reads out of the disk, cancellable piece by piece

    # -- helpers ---------------------------------------------------------------------------------

    def _pool(self, name: TierName) -> PoolTier:
        tier = self.tiers.get(TierName(name))
        if not isinstance(tier, PoolTier):
            raise ConfigError(f"tier {name!r}: expected a gpu or host pool among {sorted(map(str, self.tiers))}")
        return tier

    def _submitted(self) -> "torch.cuda.Event | None":
        """An event on the submitter's current CUDA stream (None without CUDA) that a job's copies wait on:
        a save must not read KV a kernel still writes, nor a load overwrite blocks one still reads."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._stream.device))
        return event

    def _on_stream(self, after: "torch.cuda.Event | None" = None):
        """The transfer stream as the current stream (waiting first on `after`); a no-op without CUDA."""
        if self._stream is None:
            return nullcontext()
        if after is not None:
            self._stream.wait_event(after)
        return torch.cuda.stream(self._stream)

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
        if src is TierName.DISK or src is TierName.REMOTE:
            if src is TierName.DISK and priority > PRIORITY_LOAD and len(keys) > self.DISK_LOAD_BATCH:
                _check_len(keys, dst_slots, "dst_slots")
                return self._pieces.submit(self._disk_worker(), handle, keys, dst_slots,
                                           lambda k, d: self._read_disk(k, dst, d), self.DISK_LOAD_BATCH, priority)
            return self._disk_worker().submit(
                lambda: self._read_disk(keys, dst, dst_slots, src_tiers=[src] * len(keys)), handle, priority)
        if dst in OUTSIDE:
            return self._write_disk(keys, src, src_slots, handle, dst)
        _check_len(keys, src_slots, "src_slots")
        _check_len(keys, dst_slots, "dst_slots")
        src_pool, dst_pool = self._pool(src).pool, self._pool(dst).pool
        submitted = self._submitted()

        def job() -> None:
            with self._on_stream(submitted):
                copy_slot_runs(dst_pool, src_pool, slot_runs(src_slots, dst_slots), groups, self._copier,
                               lambda g: (self._sync(), handle.group_done(g)))

        return self._copies.submit(job, handle, PRIORITY_LOAD)

    def cancel(self, handle: TransferHandle) -> tuple[BlockKey, ...]:
        """Cancels the pieces not started of a background read out of the disk; returns their keys."""
        later = lambda fn: self._copies.submit(fn, TransferHandle(), PRIORITY_LOAD)  # noqa: E731
        return self._pieces.cancel(self._disk, handle, later) if self._disk is not None else ()

    def _disk_worker(self) -> Worker:
        if self._disk is None:
            raise ConfigError("no disk or remote tier was given to this Transferer")
        return self._disk

    def _read_disk(self, keys: Sequence[BlockKey], dst: TierName, dst_slots: Sequence[int],
                   on_landed: Callable[[list[int]], None] | None = None,
                   src_tiers: Sequence[TierName] = ()) -> list[BlockKey]:
        """Reads blocks from disk (or, per block, from `src_tiers`) into pool slots; returns the keys that missed.

        First waits until copies queued before this read (a demotion snapshotting a slot about to be
        filled) have read their source slots, and until in-flight disk writes of these keys have
        committed. `on_landed(indices)` is called as batches of blocks arrive (see `DiskTier.get_many`).
        """
        _check_len(keys, dst_slots, "dst_slots")
        self._fence(keys)
        tiers, pool = list(src_tiers) or [TierName.DISK] * len(keys), self._pool(dst).pool
        if pool.device.type == "cpu":
            found = get_outside(self.tiers, tiers, keys, [pool.block(s) for s in dst_slots], on_landed,
                                self.DISK_LOAD_BATCH)
        else:  # CUDA destination: through one reused pinned staging block
            staging = torch.empty(self.spec.bytes_per_block, dtype=torch.uint8, pin_memory=True)
            found = []
            for i, (key, slot) in enumerate(zip(keys, dst_slots)):
                ok = self.tiers[tiers[i]].get(key, staging) is not None
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
                    handle: TransferHandle, dst: TierName = TierName.DISK) -> TransferHandle:
        _check_len(keys, src_slots, "src_slots")
        pool = self._pool(src).pool
        disk = self.tiers[dst]

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
             buffer: KVBuffer, dst_blocks: Sequence[int], *, num_groups: int = 4, growth: float = 1.0,
             priority: int = PRIORITY_LOAD, description: str = "",
             wait_for: Sequence[TransferHandle] = ()) -> TransferHandle:
        """Copies blocks from pool tiers and disk into the engine's KV, layer group by layer group.

        Disk blocks are read into the host slots booked for them (where a cold read lands without a copy,
        `disk.uncached`) and copied on: with several layer groups (and no remote block) group by group
        (`DiskTier.get_many(layer_groups=...)`, a group's blocks copied on in batches as they land), so the
        engine computes while the rest is read, else whole, each batch copied on while the next is read.

        Args:
            keys: the blocks, in prompt order.
            src_tiers: the tier each block is read from (gpu, host or disk).
            src_slots: each block's slot in its tier; for a disk block, the host slot that receives a
                copy of it (booked by the decision half).
            buffer: the engine's KV memory.
            dst_blocks: the engine's block index for each block.
            num_groups, growth: layer groups (`KVSpec.layer_groups`); the handle completes them in order.
            wait_for: moves into the host slots this load reads (a promotion it joined): the load starts
                once they have completed, and a block they failed to deliver is a failed block here.
        """
        keys = tuple(keys)
        for name, values in (("src_tiers", src_tiers), ("src_slots", src_slots), ("dst_blocks", dst_blocks)):
            _check_len(keys, values, name)
        check_same_spec(self.spec, buffer.spec, "load")
        groups = self.spec.layer_groups(min(num_groups, self.spec.num_layers), growth)
        handle = TransferHandle(keys, groups, description or f"load x{len(keys)}")
        if not keys:
            handle.finish()
            return handle
        tiers = [TierName(t) for t in src_tiers]
        disk_idx = [i for i, t in enumerate(tiers) if t in OUTSIDE]  # disk and remote blocks
        submitted = self._submitted()

        def write_group(g: int, indices: Sequence[int], sources: Sequence[TierName]) -> None:
            # layer group g of the blocks at `indices` from their slots in `sources`, one batch over the
            # copier's threads
            if not indices:
                return
            lo, hi = groups[g]
            runs = runs_by_tier([sources[i] for i in indices], [src_slots[i] for i in indices])
            with self._on_stream(submitted):
                write_pieces(buffer, [([dst_blocks[i] for i in indices[j:j + n]],
                                       self._pool(tier).pool.blocks(s0, n)[:, lo:hi]) for tier, j, s0, n in runs],
                             (lo, hi), self._copier)
                self._sync()

        def fail(err: BaseException) -> None:  # after the copies already queued: none writes once it has ended
            self._copies.submit(lambda: handle.finish(keys, error=err), TransferHandle(), PRIORITY_LOAD)

        def copy_groups(failed: set[BlockKey], done: frozenset[int] = frozenset()) -> list[BlockKey]:
            # after a failed block nothing is delivered: the engine recomputes from the first failure;
            # blocks in `done` were already written whole (disk blocks, as their reads landed)
            usable = next((i for i, k in enumerate(keys) if k in failed), len(keys))
            for g in range(len(groups)):
                write_group(g, [i for i in range(usable) if i not in done], tiers)
                handle.group_done(g)
            return list(keys[usable:])

        if not disk_idx:
            when_done(wait_for, handle, lambda: self._copies.submit(
                lambda: copy_groups(failed_of(wait_for, keys)), handle, PRIORITY_LOAD))
            return handle
        disk_keys = [keys[i] for i in disk_idx]
        if len(groups) > 1 and all(tiers[i] is TierName.DISK for i in disk_idx):
            sources = [TierName.HOST if t in OUTSIDE else t for t in tiers]
            in_memory = [i for i, t in enumerate(tiers) if t not in OUTSIDE]

            def deliver(g: int, indices: Sequence[int], last: bool) -> None:
                # disk blocks are copied on as their group lands, the others with the group's last copy
                if handle.done():  # the load failed: nothing more is written into the engine's KV
                    return
                try:
                    write_group(g, indices, sources)
                except BaseException as err:  # the load fails whole (its own job would not see this one's error)
                    handle.finish(keys, error=err)
                if last:
                    handle.group_done(g)

            def on_copy(g: int, indices: Sequence[int], last: bool = False) -> None:
                self._copies.submit(lambda: deliver(g, indices, last), TransferHandle(), PRIORITY_LOAD)

            def read_layered() -> None:
                try:
                    self._fence(disk_keys)
                    outs = [self._pool(TierName.HOST).pool.block(src_slots[i]) for i in disk_idx]
                    found = self.tiers[TierName.DISK].get_many(
                        disk_keys, outs, layer_groups=groups, on_part=lambda g, landed: on_copy(
                            g, sorted(disk_idx[j] for j in landed)), on_group=lambda g: on_copy(g, in_memory, True))
                except BaseException as err:
                    fail(err)
                    return
                missed = {k for k, ok in zip(disk_keys, found) if not ok} | failed_of(wait_for, keys)
                usable = next((i for i, k in enumerate(keys) if k in missed), len(keys))
                # after the groups' copies (one FIFO worker): the handle ends with the failed keys
                self._copies.submit(lambda: list(keys[usable:]), handle, PRIORITY_LOAD)

            when_done(wait_for, handle, lambda: self._disk_worker().submit(read_layered, TransferHandle(), priority))
            return handle

        def write_whole(batch: list[int]) -> None:
            with self._on_stream(submitted):
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
                                             [src_slots[i] for i in disk_idx], landed,
                                             src_tiers=[tiers[i] for i in disk_idx])) | failed_of(wait_for, keys)
                # disk blocks were written whole as they landed (`done`)
                self._copies.submit(lambda: copy_groups(missed, frozenset(disk_idx)), handle, PRIORITY_LOAD)
            except BaseException as err:
                fail(err)

        when_done(wait_for, handle, lambda: self._disk_worker().submit(read_then_copy, TransferHandle(), priority))
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
        submitted = self._submitted()

        def job() -> None:
            with self._on_stream(submitted):
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


def _no_op() -> None:
    return None


def _check_len(keys: Sequence[object], values: Sequence[object], name: str) -> None:
    if len(values) != len(keys):
        raise ConfigError(f"{name}: expected one per key ({len(keys)}), got {len(values)}")
