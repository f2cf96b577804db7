"""The disk tier's background writer: queued saves batched into LMDB write transactions.

Primitives:
- `DiskWriter(tier, batch_max_blocks)`: owns one `Worker` thread; `submit(keys, flats, on_commit)` queues
  blocks and returns a `TransferHandle`; `flush(timeout)`; `close()`.

How it batches: every queued block goes to one FIFO; a drain job on the worker takes up to
`batch_max_blocks` blocks (from one or several `put_async` calls) and writes them in one transaction
(`DiskTier.write_batch`), then queues itself again while blocks remain (so the fsync of one transaction
overlaps the queueing of the next blocks, and a long queue never holds the worker in one job).

Invariants:
- a handle completes (and its `on_commit` runs) only after every transaction holding its blocks has
  committed, or failed: "acknowledged means durable";
- `acknowledged_blocks` grows by a batch's committed blocks right after its commit;
- every handle completes exactly once, even when a transaction raises (its keys then go to `failed` and
  the error to `handle.error`); `close()` commits what is queued before joining the thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from kvtier.tiers.errors import ClosedError, TransferTimeout
from kvtier.tiers.worker import PRIORITY_SAVE, TransferHandle, Worker

if TYPE_CHECKING:
    from kvtier.tiers.disk.store import DiskTier

log = logging.getLogger(__name__)


class _Save:
    """One `put_async` call in flight."""

    __slots__ = ("handle", "remaining", "committed", "failed", "error", "on_commit")

    def __init__(self, handle: TransferHandle, num_blocks: int, on_commit: Callable[[list[bytes]], None] | None):
        self.handle = handle
        self.remaining = num_blocks
        self.committed: list[bytes] = []
        self.failed: list[bytes] = []
        self.error: BaseException | None = None
        self.on_commit = on_commit


class DiskWriter:
    """Batches queued blocks into write transactions on one owned thread."""

    def __init__(self, tier: "DiskTier", batch_max_blocks: int) -> None:
        self.tier = weakref.proxy(tier)  # the tier owns its writer: no cycle, a closed tier is freed at once
        self.batch_max_blocks = batch_max_blocks
        self._queue: collections.deque[tuple[_Save, bytes, np.ndarray]] = collections.deque()
        self._cond = threading.Condition()
        self._scheduled = False
        self._in_flight = 0
        self._closed = False
        self._worker: Worker | None = None

    def submit(self, keys: Sequence[bytes], flats: Sequence[np.ndarray],
               on_commit: Callable[[list[bytes]], None] | None = None) -> TransferHandle:
        """Queues blocks; the handle completes after their transactions commit.

        Raises:
            ClosedError: the writer was closed.
        """
        handle = TransferHandle(keys, description=f"disk save x{len(keys)}")
        if not keys:
            handle.finish()
            return handle
        save = _Save(handle, len(keys), on_commit)
        with self._cond:
            if self._closed:
                raise ClosedError(f"disk tier on {self.tier.path!r} is closed")
            self._queue.extend((save, key, flat) for key, flat in zip(keys, flats))
            if not self._scheduled:
                self._scheduled = True
                if self._worker is None:
                    self._worker = Worker("kvtier-disk-writer")
                self._worker.submit(self._drain, priority=PRIORITY_SAVE)
        return handle

    def _drain(self) -> None:
        while True:
            with self._cond:
                n = min(self.batch_max_blocks, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                self._in_flight = n
            if batch:
                self._write(batch)
            with self._cond:
                self._in_flight = 0
                if not self._queue:
                    self._scheduled = False
                    self._cond.notify_all()
                    return
                try:  # run the next batch as its own job, so loads queued meanwhile are not held back
                    self._worker.submit(self._drain, priority=PRIORITY_SAVE)  # type: ignore[union-attr]
                    return
                except ClosedError:
                    pass  # closing: finish the queue in this job

    def _write(self, batch: list[tuple[_Save, bytes, np.ndarray]]) -> None:
        error: BaseException | None = None
        try:
            done, full = self.tier.write_batch([(key, flat) for _, key, flat in batch])
        except BaseException as err:  # reported through every handle of the batch
            log.warning("disk store %s: write of %d blocks failed: %s", self.tier.path, len(batch), err)
            done, full, error = [], [], err
        self.tier.record(acknowledged_blocks=len(done))
        left_out = set(full)
        finished = []
        for save, key, _ in batch:
            if error is not None:
                save.failed.append(key)
                save.error = save.error or error
            elif key in left_out:
                save.failed.append(key)
            else:
                save.committed.append(key)
            save.remaining -= 1
            if save.remaining == 0:
                finished.append(save)
        for save in finished:
            if save.on_commit is not None and save.committed:
                try:
                    save.on_commit(save.committed)
                except Exception:  # a callback's bug must not stop the writer
                    log.exception("on_commit callback of a disk save failed")
            save.handle.finish(save.failed, error=save.error)

    def flush(self, timeout: float | None = 60.0) -> None:
        """Waits until the queue is empty and the last transaction committed.

        Raises:
            TransferTimeout: not done within `timeout` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: not self._queue and not self._scheduled, timeout):
                raise TransferTimeout(f"disk store {self.tier.path!r}: {len(self._queue)} blocks still queued "
                                      f"after {timeout} s")

    @property
    def pending(self) -> int:
        """Blocks queued or being written."""
        with self._cond:
            return len(self._queue) + self._in_flight

    def close(self, timeout: float = 120.0) -> None:
        """Commits what is queued, then joins the thread (idempotent)."""
        with self._cond:
            self._closed = True
        try:
            self.flush(timeout)
        except TransferTimeout:
            log.warning("disk store %s: closing with %d blocks unsaved", self.tier.path, self.pending)
        if self._worker is not None:
            self._worker.close(timeout)
