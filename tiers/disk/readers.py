"""A restore's located values read by a few threads, each one contiguous range of data.mdb in file order.

Why: one thread reading a restore's values in file order keeps one read in flight, and the kernel's
readahead for that one stream is all the queue depth the disk sees. On this project's machine (a virtio
disk shared with other VMs, 2 vCPUs under load) a cold sequential read in one thread swung from 0.47 to
1.58 s for 141 MB while the same file read as 4 contiguous quarters by 4 threads took 0.13-0.27 s: the
disk serves several streams at once, and one stalled stream no longer stalls the whole restore. Each
range keeps the property that made one stream fast: values read in file order, one `os.preadv` each,
straight into their final place, from a descriptor of its own (its own readahead state, advised
sequential), so the kernel sees a few sequential readers instead of one stream broken into pieces.

Primitives:
- `split_ranges(located, num_parts, min_part_bytes)`: a file-ordered list of (offset, length, index)
  cut into at most `num_parts` contiguous runs of about equal bytes, none below `min_part_bytes` (so a
  small read stays one run, read by the caller itself).
- `ReaderPool(num_threads)`: a bounded pool of reader threads, started on first use and joined by
  `close()`. `read(path, fd, located, read_one, on_result)` reads the runs in parallel and reports each
  value to `on_result(index, reason, length)` on the calling thread as it lands (so a caller's
  bookkeeping and callbacks run in one thread), and each part to `on_piece(part, index)`; a run of one
  is read by the caller from `fd`. `Batches` gathers those parts into batches per part for a caller. With
  `num_parts` > 1 each reader reads part 0 of every value of its run, then part 1, and so on (an
  engine's layer groups: the first layers of the whole restore land first, so the engine computes
  them while the rest is read), its descriptor advised random when read through the page cache
  (readahead would read the skipped parts first), and `on_part(p)` is called once part p of every
  value is in place. Given `extent` (and the read through the page cache), an announcer thread first
  tells the kernel every part's bytes in the order they will be read (`POSIX_FADV_WILLNEED`), so the
  disk sees a deep queue of reads in that order: parts skip bytes, so the kernel's own readahead cannot
  do it (31 values of 2.95 MB in 4 parts, cold, other core busy, median of 5-6: one reader 106-122 ms
  without, 70-82 with; four readers 83-84 and 80-83; docs/disk-reads.md).
  A read whose bytes are mostly out of the page cache is read around it instead (`disk.uncached`: each
  reader's descriptor opened with O_DIRECT, nothing announced): the same requests at the disk, a fraction
  of the CPU, and none at all for the bytes that land in a host slot placed for it (`pool.HostTier`).

Invariants:
- when `read` returns (or raises), no reader thread touches a destination any more: it waits for every
  run, also after a failure (a reader's error stops the other runs at their next value, then is raised);
- each value is checked by `read_one` exactly as a one-thread read checks it (header, checksum): a bad
  value is reported with its reason, never as delivered (its parts before the checksum's may have been
  reported to `on_piece`);
- at most `num_threads` reads are in flight per pool, whatever the number of concurrent `read` calls
  (their runs queue);
- the announcer only advises (no destination is touched; a failed advice is logged and ignored), runs
  at most ANNOUNCE_AHEAD_BYTES ahead of the readers, and has stopped when `read` returns.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

from kvtier.tiers.disk.uncached import Readable, UncachedFile, close, mostly_cold
from kvtier.tiers.errors import ClosedError, ConfigError

log = logging.getLogger(__name__)

#: reader threads of a disk tier unless told otherwise (4 streams: measured at 3-4x one stream here)
DEFAULT_READ_THREADS = 4
#: the smallest range worth its own thread: below it a thread's start and a short stream cost more
#: than the queue depth gains (a restore of 31 blocks of 3 MB is cut into 4 ranges, a block or two not)
MIN_PART_BYTES = 8 << 20
#: the most bytes announced and not yet read: a restore larger than the free memory must not push its own
#: announced pages out before they are read (an engine's restore of 2k tokens here is 94 MB)
ANNOUNCE_AHEAD_BYTES = 256 << 20
#: how long `read` waits for a reader before logging that it is still waiting (a read cannot be
#: abandoned: the reader would write into a destination its caller no longer owns)
STALL_LOG_S = 30.0

#: (file offset, length, index into the caller's keys), in file order
Located = tuple[int, int, int]
#: read_one(fd, offset, length, index, part) -> None when (so far) delivered, else the reason
ReadOne = Callable[[Readable, int, int, int, int], "str | None"]
#: extent(index, part) -> (file offset, bytes) that read_one reads for that part of that value
Extent = Callable[[int, int], "tuple[int, int]"]
OnResult = Callable[[int, "str | None", int], None]
_DONE = object()


def split_ranges(located: Sequence[Located], num_parts: int, min_part_bytes: int = MIN_PART_BYTES
                 ) -> list[list[Located]]:
    """Cuts a file-ordered run of values into at most `num_parts` contiguous runs of about equal bytes.

    Args:
        located: (offset, length, index) sorted by offset.
        num_parts: the most runs wanted (>= 1).
        min_part_bytes: no run is planned below this many bytes (fewer runs instead).

    Returns:
        the runs, in file order; their concatenation is `located` (empty when `located` is).

    Raises:
        ConfigError: `num_parts` below 1.
    """
    if num_parts < 1:
        raise ConfigError(f"num_parts: expected >= 1, got {num_parts}")
    if not located:
        return []
    total = sum(length for _, length, _ in located)
    parts = max(1, min(num_parts, len(located), total // max(min_part_bytes, 1)))
    runs: list[list[Located]] = []
    run: list[Located] = []
    done = 0
    for item in located:
        # a run ends at the value boundary nearest its share of the bytes (the last run takes what is left)
        cut = total * (len(runs) + 1)  # the boundary, in bytes x parts
        if run and len(runs) < parts - 1 and (done + item[1]) * parts - cut > cut - done * parts:
            runs.append(run)
            run = []
        run.append(item)
        done += item[1]
    runs.append(run)
    return runs


class ReaderPool:
    """A bounded pool of threads that read ranges of a file for `DiskTier.get_many` (see the module docstring)."""

    def __init__(self, num_threads: int = DEFAULT_READ_THREADS, min_part_bytes: int = MIN_PART_BYTES,
                 uncached: bool = True) -> None:
        """
        Args:
            num_threads: reader threads at most (1: every read stays in the calling thread; a large read in
                parts is announced by one more thread).
            min_part_bytes: the smallest range given its own thread.
            uncached: reader threads read around the page cache (O_DIRECT, `disk.uncached`) when the read's
                bytes are out of it and the file system allows it.

        Raises:
            ConfigError: `num_threads` not a positive int, or `min_part_bytes` negative.
        """
        if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
            raise ConfigError(f"read_threads: expected a positive int, got {num_threads!r}")
        if not isinstance(uncached, bool):
            raise ConfigError(f"uncached_reads: expected true or false, got {uncached!r}")
        if min_part_bytes < 0:
            raise ConfigError(f"min_part_bytes: expected >= 0, got {min_part_bytes}")
        self.num_threads = num_threads
        self.min_part_bytes = min_part_bytes
        self.uncached = uncached
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._announcer: ThreadPoolExecutor | None = None
        self._closed = False

    def _pool(self, announcer: bool = False) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise ClosedError("disk reader pool is closed")
            if announcer:
                if self._announcer is None:
                    self._announcer = ThreadPoolExecutor(1, thread_name_prefix="kvtier-disk-announce")
                return self._announcer
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.num_threads, thread_name_prefix="kvtier-disk-read")
            return self._executor

    def read(self, path: str, fd: int, located: Sequence[Located], read_one: ReadOne, on_result: OnResult,
             num_parts: int = 1, on_part: Callable[[int], None] | None = None, extent: Extent | None = None,
             on_piece: Callable[[int, int], None] | None = None) -> None:
        """Reads every located value, a few contiguous ranges in parallel, reporting each as it lands.

        Args:
            path: the file the values are in (each reader opens its own descriptor of it).
            fd: a descriptor of the same file, for a read that stays in the calling thread.
            located: (offset, length, index) sorted by offset.
            read_one: `read_one(fd, offset, length, index, part)` reads part `part` of one value into its
                place and checks it, returning None when delivered (so far), else the reason (see
                `disk.read`); called from reader threads, one value at a time per thread, a value's parts
                in order on one thread.
            on_result: `on_result(index, reason, length)`, called on the calling thread for every value once
                its last part is read, in the order they land.
            num_parts: parts per value (1: each value whole).
            on_part: `on_part(p)`, called on the calling thread once part p of every value was read.
            on_piece: `on_piece(p, index)`, called on the calling thread as part p of a value lands with no
                fault found so far (its checksum is decided with its last part), before `on_part(p)`.
            extent: with `num_parts` > 1, `extent(index, part)` gives the file bytes of each part, which the
                announcer asks the kernel for ahead of the readers (None, or a read below `min_part_bytes`:
                no announcing).

        Raises:
            OSError: a read failed (raised once every reader has stopped).
            ClosedError: the pool was closed.
        """
        runs = split_ranges(located, self.num_threads, self.min_part_bytes)
        uncached = self.uncached and len(runs) > 1 and mostly_cold(fd, [(o, n) for o, n, _ in located])
        window, announcing = None, None
        if extent is not None and num_parts > 1 and not uncached and hasattr(os, "posix_fadvise") and \
                sum(length for _, length, _ in located) >= max(self.min_part_bytes, 1):
            window = _Window(ANNOUNCE_AHEAD_BYTES)
            try:
                announcing = self._pool(announcer=True).submit(_announce, path, located, extent, num_parts, window)
            except RuntimeError as err:  # shut down between _pool() and submit
                raise ClosedError("disk reader pool is closed") from err
            read_one = window.counting(read_one, extent)
        try:
            self._read(path, fd, runs, read_one, on_result, num_parts, on_part, uncached, on_piece)
        finally:
            if window is not None:
                window.close()
                if not announcing.cancel():  # not started (behind another read's): dropped, else waited for
                    _wait_all([announcing])

    def _read(self, path: str, fd: int, runs: Sequence[Sequence[Located]], read_one: ReadOne, on_result: OnResult,
              num_parts: int, on_part: Callable[[int], None] | None, uncached: bool,
              on_piece: Callable[[int, int], None] | None) -> None:
        if len(runs) <= 1:
            for part in range(num_parts):
                for offset, length, i in (runs[0] if runs else ()):
                    reason = read_one(fd, offset, length, i, part)
                    if reason is None and on_piece is not None:
                        on_piece(part, i)
                    if part == num_parts - 1:
                        on_result(i, reason, length)
                if on_part is not None:
                    on_part(part)
            return
        results: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        pool = self._pool()
        futures: list[Future] = []
        try:
            for run in runs:
                futures.append(pool.submit(_read_run, path, run, read_one, num_parts, results, stop, uncached))
        except RuntimeError as err:  # the executor was shut down between _pool() and submit
            stop.set()
            _wait_all(futures)
            raise ClosedError("disk reader pool is closed") from err
        error: BaseException | None = None
        pending, left = len(futures), [sum(len(run) for run in runs)] * num_parts
        while pending:
            try:
                item = results.get(timeout=STALL_LOG_S)
            except queue.Empty:
                log.warning("disk read of %s: %d of %d ranges still reading after %.0f s", path, pending,
                            len(futures), STALL_LOG_S)
                continue
            if item is _DONE:
                pending -= 1
            elif isinstance(item, BaseException):
                error = error or item
                stop.set()
            elif error is None:
                part, i, reason, length = item
                left[part] -= 1
                try:
                    if reason is None and on_piece is not None:
                        on_piece(part, i)
                    if part == num_parts - 1:
                        on_result(i, reason, length)
                    if not left[part] and on_part is not None:  # a reader's parts are queued in order
                        on_part(part)
                except BaseException as err:  # the caller's bookkeeping failed: stop, wait, then raise
                    error = err
                    stop.set()
        if error is not None:
            raise error

    def close(self) -> None:
        """Joins the reader threads (a read in progress finishes first); idempotent."""
        with self._lock:
            self._closed = True
            executors = (self._executor, self._announcer)
            self._executor = self._announcer = None
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=True)


def _read_run(path: str, run: Sequence[Located], read_one: ReadOne, num_parts: int, results: queue.SimpleQueue,
              stop: threading.Event, uncached: bool) -> None:
    """One reader's range: its own descriptor, values in file order (part by part); every outcome goes to
    `results`."""
    try:
        fd = _open(path, num_parts, uncached)
        try:
            for part in range(num_parts):
                for offset, length, i in run:
                    if stop.is_set():
                        return
                    results.put((part, i, read_one(fd, offset, length, i, part), length))
        finally:
            close(fd)
    except BaseException as err:  # reported to the caller, which raises it once every reader stopped
        results.put(err)
    finally:
        results.put(_DONE)


def _open(path: str, num_parts: int, uncached: bool) -> Readable:
    """A reader's own descriptor: uncached when asked and allowed, else buffered with readahead advice."""
    if uncached:
        try:
            return UncachedFile(path)
        except OSError as err:  # the file system refuses O_DIRECT: read through the page cache
            log.debug("disk read of %s: through the page cache (%s)", path, err)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    if hasattr(os, "posix_fadvise"):  # parts skip bytes: readahead would read them first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL if num_parts == 1 else os.POSIX_FADV_RANDOM)
    return fd


class _Window:
    """How far the announcer is ahead of the readers, in bytes (both counted from the read's start, so a
    reader ahead of the announcer never holds it back); `close` ends its wait."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._limit, self._announced, self._read, self._closed = limit, 0, 0, False

    def announce(self, size: int) -> bool:
        """Waits until `size` more bytes are within the limit ahead of the readers; False once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._announced + size - self._read <= self._limit
                                or self._announced <= self._read)
            self._announced += size
            return not self._closed

    def counting(self, read_one: ReadOne, extent: Extent) -> ReadOne:
        """`read_one` that counts the bytes of every part it reads."""
        def counted(fd: Readable, offset: int, length: int, i: int, part: int) -> "str | None":
            try:
                return read_one(fd, offset, length, i, part)
            finally:
                with self._cond:
                    self._read += extent(i, part)[1]
                    self._cond.notify_all()
        return counted

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _announce(path: str, located: Sequence[Located], extent: Extent, num_parts: int, window: _Window) -> None:
    """Advises the kernel of every part's bytes (WILLNEED), part 0 of every value first, within the window."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        log.debug("disk read of %s: not announced (%s)", path, err)
        return
    try:
        for part in range(num_parts):
            for _, _, i in located:
                offset, size = extent(i, part)
                if not window.announce(size):
                    return
                if size:
                    os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
    except Exception as err:  # noqa: BLE001 - only advice: the readers read regardless
        log.debug("disk read of %s: announcing stopped (%s)", path, err)
    finally:
        os.close(fd)


def _wait_all(futures: Sequence[Future]) -> None:
    for future in futures:
        while True:
            try:
                future.result(timeout=STALL_LOG_S)
                break
            except TimeoutError:
                log.warning("disk reader pool: a reader is still running after %.0f s", STALL_LOG_S)
            except BaseException:  # noqa: BLE001 - its error went through the results queue
                break


class Batches:
    """Landed values reported in batches: `piece(p, index)` gathers part p of values into batches of
    `batch` for `on_part(p, indices)`; `group(p)` (`ReaderPool.read`'s `on_part`) reports part p's last
    batch, then calls `on_group(p)`."""

    def __init__(self, num_groups: int, batch: int, on_part: Callable[[int, list[int]], None] | None,
                 on_group: Callable[[int], None] | None) -> None:
        self.num_groups = num_groups
        self._pending: list[list[int]] = [[] for _ in range(num_groups)]
        self._batch, self._on_part, self._on_group = max(1, batch), on_part, on_group

    def piece(self, group: int, index: int) -> None:
        batch = self._pending[group]
        batch.append(index)
        if len(batch) >= self._batch:
            self._flush(group)

    def group(self, group: int) -> None:
        self._flush(group)
        if self._on_group is not None:
            self._on_group(group)

    def _flush(self, group: int) -> None:
        batch = self._pending[group]
        if batch and self._on_part is not None:
            self._on_part(group, batch[:])
        batch.clear()
