"""Handles for background work, and the worker threads that run it.

Primitives:
- `TransferHandle`: what the engine waits on: `wait(timeout)` for the whole job, `wait_layer(layer,
  timeout)` for one layer's bytes, `failed` (keys that missed or failed their checks), done callbacks.
- `Worker`: one thread running jobs from a priority queue (lower number first, FIFO within a
  priority: loads for running requests before prefetches before saves); `cancel(handle)` removes a job
  that has not started; `close()` joins it.

Invariants:
- every wait takes a timeout and raises `TransferTimeout` when it runs out; no wait is a sleep loop;
- a handle completes exactly once; layer groups complete in order, and completing the whole job
  completes every group, so a layer waiter never waits past the job's end;
- a job that raises completes its handle with the error (re-raised by `wait`), never silently.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from typing import Any, Callable, Sequence

from kvtier.tiers.errors import ClosedError, TransferError, TransferTimeout

log = logging.getLogger(__name__)

#: priorities of background jobs (lower runs first)
PRIORITY_LOAD = 0
PRIORITY_PREFETCH = 1
PRIORITY_SAVE = 2


class TransferHandle:
    """A batched move in flight: wait for all of it or layer by layer."""

    def __init__(self, keys: Sequence[bytes] = (), layer_groups: Sequence[tuple[int, int]] | None = None,
                 description: str = "") -> None:
        self.keys = tuple(keys)
        self.layer_groups = tuple(layer_groups) if layer_groups else ((0, 1 << 30),)
        self.description = description
        self._group_events = [threading.Event() for _ in self.layer_groups]
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[["TransferHandle"], None]] = []
        self._finished = False
        self.failed: tuple[bytes, ...] = ()
        self.error: BaseException | None = None
        self.value: Any = None

    # -- consumer side ----------------------------------------------------------------------------

    def done(self) -> bool:
        """Whether the whole job has finished (successfully or not)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = 60.0) -> "TransferHandle":
        """Waits for the whole job.

        Raises:
            TransferTimeout: not done within `timeout` seconds.
            TransferError: the job failed as a whole (its cause chained).
        """
        if not self._done.wait(timeout):
            raise TransferTimeout(f"transfer {self.description or ''} not done after {timeout} s".replace("  ", " "))
        if self.error is not None:
            raise TransferError(f"transfer {self.description} failed: {self.error}") from self.error
        return self

    def group_of(self, layer: int) -> int:
        """Index of the layer group holding `layer`."""
        for g, (lo, hi) in enumerate(self.layer_groups):
            if lo <= layer < hi:
                return g
        raise IndexError(f"layer {layer} is in no layer group of this transfer {self.layer_groups}")

    def wait_layer(self, layer: int, timeout: float | None = 60.0) -> None:
        """Waits until `layer`'s bytes of every block have arrived (or the job ended).

        Raises:
            TransferTimeout: not arrived within `timeout` seconds.
            TransferError: the job failed as a whole.
        """
        if not self._group_events[self.group_of(layer)].wait(timeout):
            raise TransferTimeout(f"transfer {self.description}: layer {layer} not loaded after {timeout} s")
        if self.error is not None:
            raise TransferError(f"transfer {self.description} failed: {self.error}") from self.error

    def layer_ready(self, layer: int) -> bool:
        """Whether `layer`'s bytes have arrived."""
        return self._group_events[self.group_of(layer)].is_set()

    def add_done_callback(self, fn: Callable[["TransferHandle"], None]) -> None:
        """Calls `fn(handle)` when the job ends (at once if it has)."""
        with self._lock:
            if not self._finished:
                self._callbacks.append(fn)
                return
        fn(self)

    # -- producer side ----------------------------------------------------------------------------

    def group_done(self, group: int) -> None:
        """Marks layer group `group` (and every group before it) as arrived."""
        for g in range(group + 1):
            self._group_events[g].set()

    def finish(self, failed: Sequence[bytes] = (), error: BaseException | None = None, value: Any = None) -> None:
        """Completes the job: `failed` keys missed or failed their checks; `error` failed it whole.

        Done callbacks run before waiters wake, so whoever waits sees their effects (the decision half's
        books already updated).
        """
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self.failed = tuple(failed)
            self.error = error
            self.value = value
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a callback's bug must not break the worker that completed the job
                log.exception("done callback of transfer %s failed", self.description)
        for event in self._group_events:
            event.set()
        self._done.set()

    @classmethod
    def completed(cls, keys: Sequence[bytes] = (), failed: Sequence[bytes] = (), value: Any = None) -> "TransferHandle":
        """A handle that is already done (nothing to move)."""
        handle = cls(keys)
        handle.finish(failed, value=value)
        return handle


class Worker:
    """One background thread running jobs in priority order; owned by the object that closes it.

    `on_start` runs first on that thread (e.g. `copies.one_torch_thread`).
    """

    def __init__(self, name: str, on_start: Callable[[], Any] | None = None) -> None:
        self.name = name
        self._on_start = on_start
        self._queue: list[tuple[int, int, Callable[[], None], TransferHandle]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], handle: TransferHandle | None = None,
               priority: int = PRIORITY_LOAD) -> TransferHandle:
        """Queues `fn`; the returned handle finishes with `fn`'s return value as `failed` keys (a list
        of keys, or None for none) unless `fn` finishes the handle itself.

        Raises:
            ClosedError: the worker was closed.
        """
        handle = handle or TransferHandle()

        def job() -> None:
            try:
                failed = fn()
            except BaseException as err:  # reported through the handle, never swallowed
                handle.finish(handle.keys, error=err)
                return
            if not handle.done():
                handle.finish(failed if isinstance(failed, (list, tuple)) else ())

        with self._cond:
            if self._closed:
                raise ClosedError(f"worker {self.name} is closed")
            heapq.heappush(self._queue, (priority, next(self._counter), job, handle))
            self._cond.notify()
        return handle

    def cancel(self, handle: TransferHandle) -> bool:
        """Removes the queued job of `handle` if it has not started; True if removed (the handle is
        then left unfinished: the caller decides what its cancellation means)."""
        with self._cond:
            for i, item in enumerate(self._queue):
                if item[3] is handle:
                    self._queue[i] = self._queue[-1]
                    self._queue.pop()
                    heapq.heapify(self._queue)
                    return True
        return False

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:  # the jobs still run: a failed set-up must not leave their handles hanging
                log.exception("worker %s: on_start failed", self.name)
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = heapq.heappop(self._queue)[2]
            job()

    def close(self, timeout: float = 30.0) -> None:
        """Runs what is queued, then stops the thread and joins it (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("worker %s did not stop within %.0f s", self.name, timeout)

    @property
    def pending(self) -> int:
        """Jobs queued and not started."""
        with self._cond:
            return len(self._queue)
