"""CPU copies: the work-sharing copier is byte-exact on every kernel it uses; serial torch per thread."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from kvtier.tiers import copies
from kvtier.tiers.copies import TORCH_PIECE_BYTES, ParallelCopier, one_torch_thread

OPENMP = sys.platform == "linux" and "OpenMP" in torch.__config__.parallel_info()


def on_thread(fn):
    """`fn()` on a fresh thread; its result."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    assert out, "the thread did not finish"
    return out[0]


def test_one_torch_thread_sets_the_calling_thread_only():
    before = torch.get_num_threads()
    serial, count = on_thread(lambda: (one_torch_thread(), torch.get_num_threads()))
    if OPENMP:
        assert serial and count == 1, "torch's OpenMP runtime was not reached"
    assert torch.get_num_threads() == before  # this thread keeps its count
    assert on_thread(torch.get_num_threads) == before  # and a new thread gets torch's own setting


@pytest.mark.skipif(not OPENMP, reason="torch's OpenMP runtime is needed for its serial copy loop")
def test_copier_is_exact_into_memory_off_a_cache_line(monkeypatch):
    """Pieces of several MiB into a destination 80 bytes into a page (host slots sit there), copied with torch's
    loop on serial threads (the caller and the helper), with runs of odd sizes and order."""
    size = 9 * TORCH_PIECE_BYTES + 12345
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = torch.zeros(size + 8192, dtype=torch.uint8)
    start = (80 - whole.data_ptr()) % 4096
    dst = whole[start:start + size]
    cuts = [0, 5 * TORCH_PIECE_BYTES + 7, 6 * TORCH_PIECE_BYTES, size]
    runs = [(dst.data_ptr() + a, src.data_ptr() + a, b - a) for a, b in zip(cuts, cuts[1:])][::-1]
    viewed = []
    real_at = copies._at
    monkeypatch.setattr(copies, "_at", lambda address, n: viewed.append(n) or real_at(address, n))
    copier = ParallelCopier(2)
    try:
        on_thread(lambda: (one_torch_thread(), copier.copy(runs)))
    finally:
        copier.close()
    assert viewed, "no piece went through torch's loop"
    assert torch.equal(dst, src)
    assert not whole[:start].any() and not whole[start + size:].any()  # nothing written outside the runs
