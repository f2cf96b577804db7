"""CPU memory copies at memory bandwidth: what tier-to-tier moves and engine copies are made of.

Primitives:
- `copy_tensor(dst, src)`: one tensor into another, single-threaded on CPU (one `memmove` per
  contiguous run), `copy_` on a device;
- `memory_chunks(dst, src)`: the (dst address, src address, bytes) runs of a CPU copy;
- `ParallelCopier`: a batch of runs copied by several threads taking 2 MiB pieces in turn;
- `one_torch_thread()`: torch's CPU ops on the calling thread run on that thread alone where torch's
  OpenMP runtime can be reached (kvtier's copy threads call it first);
- `copy_slot_runs(dst_pool, src_pool, runs, groups, copier, on_group)`: runs of slots from one pool into
  another, layer group by layer group.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kvtier.tiers.errors import ConfigError

log = logging.getLogger(__name__)

#: memmove copies runs in pieces of at most this many bytes (a thread takes the next piece when done). On
#: this machine's EPYC, between pools on transparent huge pages (`pool.SlotPool`), two threads copying a
#: 512 MiB batch of shuffled 8 MiB slots reached 0.98-1.05x of one `copy_` of the whole pool with 2 MiB
#: pieces, 0.96-1.00x with 1 MiB and 0.70-0.84x with 512 KiB (both directions, 2 runs of 9, 2026-12-03);
#: on 4 KiB pages 0.89-1.00x, 0.83-0.97x and 0.77-0.86x. (On an earlier day 512 KiB measured best there.)
MEMMOVE_PIECE_BYTES = 2 << 20

#: pieces at least this large whose destination is off a 64-byte line are copied with torch's copy loop on
#: threads where it runs serially (`one_torch_thread`); the others with `memmove`. Why: on this machine's EPYC,
#: torch's loop moved 13.6-14.5 GB/s on one thread into a destination off a line (host slots sit 80 bytes
#: into a page) against memmove's 11-12.7, and the device-to-host move of `kvtier bench tiers` read
#: 0.90-0.99x (mean 0.96) of one copy_ against 0.89-0.95x (mean 0.92) with memmove alone (6 runs of 15
#: each, alternating, 2026-12-03); into aligned destinations memmove measured as fast or faster.
TORCH_PIECE_BYTES = 1 << 20

_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
_OPENMP_NAMES = ("libgomp", "libiomp5", "libomp")
_serial = threading.local()


def one_torch_thread() -> bool:
    """Makes torch run its CPU ops on the calling thread alone and says whether it now does.

    Sets OpenMP's thread count of this thread only (each thread has its own), in the OpenMP runtime
    torch loaded, after torch's own first setting on this thread; torch's process-wide count and every
    other thread keep theirs. False where that runtime cannot be reached (not Linux, not OpenMP); never
    raises.
    """
    if getattr(_serial, "on", None) is None:
        _serial.on = False
        try:
            torch.get_num_threads()  # torch's lazy per-thread set-up, which would undo an earlier setting
            for runtime in _openmp_runtimes():  # another library may have loaded its own copy of one
                runtime.omp_set_num_threads(1)
                if torch.get_num_threads() == 1:
                    break
            _serial.on = torch.get_num_threads() == 1
        except Exception:  # never fatal (a pool initializer that raises breaks the pool): memmove then
            log.warning("could not make torch serial on thread %s", threading.current_thread().name, exc_info=True)
    return _serial.on


@functools.lru_cache(maxsize=1)
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (from /proc/self/maps), those in torch's folder first."""
    try:
        with open("/proc/self/maps", errors="surrogateescape") as maps:
            paths = {fields[5] for fields in map(str.split, maps) if len(fields) > 5}
    except OSError:  # no /proc (not Linux)
        return ()
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    runtimes = []
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        if os.path.basename(path).startswith(_OPENMP_NAMES):
            try:
                runtime = ctypes.CDLL(path)
                runtime.omp_set_num_threads.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):
                continue
            runtimes.append(runtime)
    return tuple(runtimes)


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
    that the threads take in turn from a shared counter, each with `memmove` or torch's copy loop
    (`TORCH_PIECE_BYTES`; both release the GIL): a thread the OS deschedules for a while leaves its
    share to the others instead of holding up the batch, as a fixed split by bytes does. The helper
    threads run torch serially (`one_torch_thread`), the calling thread where it does too; a batch
    copied on the calling thread alone (small, or one thread) takes `memmove` only. Owned by a
    `Transferer`; `close()` joins the threads.
    """

    #: below this many bytes a batch is copied on the calling thread alone
    MIN_PARALLEL_BYTES = 4 << 20
    #: the most bytes one thread copies before taking the next piece (`MEMMOVE_PIECE_BYTES`)
    PIECE_BYTES = MEMMOVE_PIECE_BYTES

    def __init__(self, num_threads: int) -> None:
        self.num_threads = max(1, num_threads)
        self._pool = (ThreadPoolExecutor(self.num_threads - 1, "kvtier-copy-helper", initializer=one_torch_thread)
                      if self.num_threads > 1 else None)

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
            serial = getattr(_serial, "on", False)  # this thread's torch copies run on it alone
            for i in iter(taken.__next__, None):
                if i >= len(pieces):
                    return
                d, s, n = pieces[i]
                if serial and n >= TORCH_PIECE_BYTES and d % 64:  # see TORCH_PIECE_BYTES
                    _at(d, n).copy_(_at(s, n))
                else:
                    ctypes.memmove(d, s, n)

        futures = [self._pool.submit(work) for _ in range(self.num_threads - 1)]
        work()
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _at(address: int, nbytes: int) -> torch.Tensor:
    """The `nbytes` bytes of CPU memory at `address` as a uint8 tensor (no copy)."""
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=torch.uint8)


def _memmove_all(chunks: Sequence[tuple[int, int, int]]) -> None:
    step = MEMMOVE_PIECE_BYTES
    for d, s, n in chunks:
        for o in range(0, n, step):
            ctypes.memmove(d + o, s + o, min(step, n - o))


def copy_slot_runs(dst_pool: Any, src_pool: Any, runs: Sequence[tuple[int, int, int, int]],
                   groups: Sequence[tuple[int, int]], copier: ParallelCopier, on_group: Callable[[int], Any]) -> None:
    """Copies runs of slots (`slot_runs`: index, first source slot, first destination slot, count) between two
    `SlotPool`s, layer group by layer group, calling `on_group(g)` after each group. On CPU the runs are
    addressed by arithmetic (no tensor views) and copied as one batch over the copier's threads."""
    spec = src_pool.spec
    on_cpu = src_pool.device.type == "cpu" and dst_pool.device.type == "cpu"
    bpb, lb = spec.bytes_per_block, spec.layer_bytes
    s_base, d_base = src_pool.data.data_ptr(), dst_pool.data.data_ptr()
    for g, (lo, hi) in enumerate(groups):
        if on_cpu:
            if len(groups) == 1:
                chunks = [(d_base + d0 * bpb, s_base + s0 * bpb, n * bpb) for _, s0, d0, n in runs]
            else:
                off, size = lo * lb, (hi - lo) * lb
                chunks = [(d_base + (d0 + i) * bpb + off, s_base + (s0 + i) * bpb + off, size)
                          for _, s0, d0, n in runs for i in range(n)]
            copier.copy(chunks)
        else:
            for _, s0, d0, n in runs:
                if len(groups) == 1:
                    copy_tensor(dst_pool.data[d0:d0 + n], src_pool.data[s0:s0 + n])
                else:
                    copy_tensor(dst_pool.blocks(d0, n)[:, lo:hi], src_pool.blocks(s0, n)[:, lo:hi])
        on_group(g)
