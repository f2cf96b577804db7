"""Background work that yields to loads: disk reads in cancellable pieces, and work started only once
other transfers have completed.

Primitives:
- `PieceReads`: `submit(worker, handle, keys, dst_slots, read, batch, priority)` queues a background read
  as jobs of `batch` blocks (so a load queued meanwhile at a higher priority waits behind one piece at
  most); `cancel(worker, handle, later)` removes the pieces not started and returns their keys;
- `when_done(handles, handle, start)`: calls `start()` once every handle in `handles` is done;
  `failed_of(handles, keys)`: which of `keys` those handles failed to deliver.

Invariants: the overall handle finishes exactly once, when its last piece has finished or been
cancelled; a cancelled piece is counted off the caller's thread (`later`), so a cancelling caller that
holds a lock never runs completion callbacks inside it.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from kvtier.tiers.keys import BlockKey
from kvtier.tiers.worker import TransferHandle, Worker

#: read(keys, dst_slots) -> the keys that missed
Read = Callable[[Sequence[BlockKey], Sequence[int]], list[BlockKey]]


class PieceReads:
    """Background reads in pieces, by their overall handle (module docstring)."""

    def __init__(self) -> None:
        self._reads: dict[int, list[TransferHandle]] = {}
        self._lock = threading.Lock()

    def submit(self, worker: Worker, handle: TransferHandle, keys: tuple[BlockKey, ...], dst_slots: Sequence[int],
               read: Read, batch: int, priority: int) -> TransferHandle:
        """Queues the read of `keys` into `dst_slots` as pieces of `batch` blocks; returns `handle`."""
        pieces = [TransferHandle(keys[i:i + batch]) for i in range(0, len(keys), batch)]
        lock = threading.Lock()
        state: dict = {"left": len(pieces), "failed": [], "error": None}

        def piece_done(piece: TransferHandle) -> None:
            with lock:
                state["failed"].extend(piece.failed)
                state["error"] = state["error"] or piece.error
                state["left"] -= 1
                last = state["left"] == 0
            if last:
                handle.finish(state["failed"], state["error"])

        with self._lock:
            self._reads[id(handle)] = pieces
        handle.add_done_callback(self._forget)
        for i, piece in enumerate(pieces):
            piece.add_done_callback(piece_done)
            k, d = keys[i * batch:(i + 1) * batch], dst_slots[i * batch:(i + 1) * batch]
            worker.submit(lambda k=k, d=d: read(k, d), piece, priority)
        return handle

    def _forget(self, handle: TransferHandle) -> None:
        with self._lock:
            self._reads.pop(id(handle), None)

    def cancel(self, worker: Worker, handle: TransferHandle,
               later: Callable[[Callable[[], None]], object]) -> tuple[BlockKey, ...]:
        """Cancels the pieces of `handle` not started; returns their keys. `later(fn)` runs `fn` off this
        thread (it counts each cancelled piece as done, which may finish `handle`)."""
        with self._lock:
            pieces = self._reads.get(id(handle))
        if pieces is None:
            return ()
        cancelled: list[BlockKey] = []
        for piece in pieces:
            if not piece.done() and worker.cancel(piece):
                cancelled.extend(piece.keys)
                later(lambda p=piece: p.finish(()))
        return tuple(cancelled)


def when_done(handles: Sequence[TransferHandle], handle: TransferHandle, start: Callable[[], object]) -> None:
    """Calls `start()` once every handle in `handles` is done (at once if they are); a failure to start
    fails `handle`."""
    waiting = [h for h in handles if not h.done()]
    left = [max(1, len(waiting))]
    lock = threading.Lock()

    def go(_: TransferHandle | None = None) -> None:
        with lock:
            left[0] -= 1
            if left[0] > 0:
                return
        try:
            start()
        except BaseException as err:  # e.g. a closed worker: reported through the waiting handle
            handle.finish(handle.keys, error=err)

    if not waiting:
        go()
        return
    for h in waiting:
        h.add_done_callback(go)


def failed_of(handles: Sequence[TransferHandle], keys: Sequence[BlockKey]) -> set[BlockKey]:
    """The keys among `keys` that finished `handles` failed to deliver (all of theirs when one failed whole)."""
    wanted = set(keys)
    return {k for h in handles for k in (h.keys if h.error is not None else h.failed) if k in wanted}
