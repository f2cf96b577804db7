"""The byte half's side of prefetch: cancelling jobs not started, promotions read in cancellable pieces,
loads that wait for the promotion they joined (real pools, real LMDB, real threads)."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.tiers.disk import DiskTier
from kvtier.tiers.errors import TransferTimeout
from kvtier.tiers.pool import HostTier
from kvtier.tiers.tier import TierName
from kvtier.tiers.transfer import Transferer
from kvtier.tiers.worker import PRIORITY_PREFETCH, TransferHandle, Worker


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def random_block(spec, seed: int) -> torch.Tensor:
    return torch.randn(spec.block_shape, generator=torch.Generator().manual_seed(seed)).to(spec.torch_dtype)


class Buffer:
    """A minimal engine KV; `gate`, when given, holds every read of it (a save) until set."""

    def __init__(self, spec, num_blocks: int, gate: threading.Event | None = None) -> None:
        self.spec = spec
        self.gate = gate
        self.data = torch.zeros((num_blocks, *spec.block_shape), dtype=spec.torch_dtype)

    def write_blocks(self, dst_blocks, src, layers):
        lo, hi = layers
        for i, b in enumerate(dst_blocks):
            self.data[b, lo:hi].copy_(src[i])

    def read_blocks(self, src_blocks, dst, layers):
        if self.gate is not None:
            assert self.gate.wait(30), "gate never opened"
        lo, hi = layers
        for i, b in enumerate(src_blocks):
            dst[i].copy_(self.data[b, lo:hi])


def test_worker_cancel_removes_only_jobs_not_started():
    worker = Worker("test-cancel")
    gate, ran = threading.Event(), []
    try:
        running = worker.submit(lambda: gate.wait(10))
        queued = worker.submit(lambda: ran.append("queued"), priority=PRIORITY_PREFETCH)
        other = worker.submit(lambda: ran.append("other"), priority=PRIORITY_PREFETCH)
        assert worker.cancel(queued)          # not started: removed
        assert not worker.cancel(queued)      # only once
        gate.set()
        other.wait(10)
        assert not worker.cancel(running)     # already ran
        worker.submit(lambda: None).wait(10)
        assert ran == ["other"] and not queued.done()
    finally:
        worker.close()


def test_load_waits_for_the_promotion_it_joined(small_spec):
    host = HostTier(small_spec, 4 * small_spec.bytes_per_block)
    blocks = [random_block(small_spec, i) for i in range(2)]
    host.put(key(0), blocks[0])
    host.put(key(1), torch.zeros_like(blocks[1]))  # the slot a promotion is filling
    slots = [host.slot_of(key(0)), host.slot_of(key(1))]
    promotion = TransferHandle([key(1)])
    buffer = Buffer(small_spec, 2)
    transfer = Transferer({TierName.HOST: host})
    try:
        load = transfer.load([key(0), key(1)], ["host", "host"], slots, buffer, [0, 1], wait_for=[promotion])
        with pytest.raises(TransferTimeout):
            load.wait(0.05)  # the promotion has not landed: the load has not started
        host.pool.blocks(slots[1], 1)[0].copy_(blocks[1])  # its bytes land...
        promotion.finish()                                                              # ...and it completes
        load.wait(10)
        assert load.failed == ()
        assert torch.equal(buffer.data[0], blocks[0]) and torch.equal(buffer.data[1], blocks[1])
    finally:
        transfer.close()


def test_a_block_the_joined_promotion_failed_is_a_failed_block_of_the_load(small_spec):
    host = HostTier(small_spec, 4 * small_spec.bytes_per_block)
    good = random_block(small_spec, 3)
    host.put(key(0), good)
    host.put(key(1), random_block(small_spec, 4))  # stale bytes in the slot the failed promotion booked
    promotion = TransferHandle([key(1)])
    promotion.finish(failed=[key(1)])
    buffer = Buffer(small_spec, 2)
    transfer = Transferer({TierName.HOST: host})
    try:
        load = transfer.load([key(0), key(1)], ["host", "host"], [host.slot_of(key(0)), host.slot_of(key(1))],
                             buffer, [0, 1], wait_for=[promotion]).wait(10)
        assert load.failed == (key(1),)
        assert torch.equal(buffer.data[0], good)
        assert not buffer.data[1].any()  # never delivered: the engine recomputes it
    finally:
        transfer.close()


def test_promotion_reads_in_pieces_and_cancels_the_pieces_not_started(small_spec, tmp_path):
    n = 3 * Transferer.DISK_LOAD_BATCH
    blocks = [random_block(small_spec, 10 + i) for i in range(n)]
    disk = DiskTier(tmp_path / "store", small_spec, 64 * small_spec.bytes_per_block)
    disk.put_many([key(i) for i in range(n)], blocks)
    host = HostTier(small_spec, (n + 2) * small_spec.bytes_per_block)
    transfer = Transferer({TierName.HOST: host, TierName.DISK: disk})
    gate = threading.Event()
    try:
        # a save whose engine read waits on the gate holds the copy worker; every disk read first fences
        # on it, so the promotion's pieces cannot finish before the gate opens
        saving = transfer.save(Buffer(small_spec, 1, gate), [0], [key(99)], "host", [n])
        keys = [key(i) for i in range(n)]
        promotion = transfer.move("disk", "host", keys, (), list(range(n)), priority=PRIORITY_PREFETCH)
        cancelled = transfer.cancel(promotion)
        gate.set()
        saving.wait(10)
        promotion.wait(10)
        b = Transferer.DISK_LOAD_BATCH
        # the piece being read (if the disk worker had taken it) goes on; every later piece is cancelled
        assert tuple(keys[-len(cancelled):]) == cancelled and len(cancelled) in (n - b, n)
        assert transfer.cancel(promotion) == ()
        for i in range(n - len(cancelled)):
            assert torch.equal(host.pool.blocks(i, 1)[0], blocks[i])
    finally:
        transfer.close()
        disk.close()
