"""Slot pools and batched transfers: byte-exact round trips, layer-wise waits, capacity, bad input."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier.tiers.errors import CapacityError, ConfigError, SpecMismatchError, TransferError, TransferTimeout
from kvtier.tiers.pool import GpuTier, HostTier
from kvtier.tiers.slots import SlotTable
from kvtier.tiers.tier import TierName, parse_size
from kvtier.tiers.transfer import Transferer
from kvtier.tiers.kvbuffer import slot_runs
from kvtier.tiers.worker import TransferHandle, Worker


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def random_block(spec, seed: int) -> torch.Tensor:
    return torch.randn(spec.block_shape, generator=torch.Generator().manual_seed(seed)).to(spec.torch_dtype)


class Buffer:
    """A minimal engine KV: one tensor of blocks in the docs/design.md layout."""

    def __init__(self, spec, num_blocks: int) -> None:
        self.spec = spec
        self.data = torch.zeros((num_blocks, *spec.block_shape), dtype=spec.torch_dtype)
        self.writes: list[tuple[int, int]] = []

    def write_blocks(self, dst_blocks, src, layers):
        lo, hi = layers
        self.writes.append(layers)
        for i, b in enumerate(dst_blocks):
            self.data[b, lo:hi].copy_(src[i])

    def read_blocks(self, src_blocks, dst, layers):
        lo, hi = layers
        for i, b in enumerate(src_blocks):
            dst[i].copy_(self.data[b, lo:hi])


def test_pool_put_get_delete_and_capacity(small_spec):
    host = HostTier(small_spec, 3 * small_spec.bytes_per_block)
    assert host.num_slots == 3 and host.num_used == 0
    blocks = [random_block(small_spec, i) for i in range(3)]
    for i, b in enumerate(blocks):
        host.put(key(i), b)
    assert host.num_used == 3 and host.used_bytes == 3 * small_spec.bytes_per_block
    for i, b in enumerate(blocks):
        assert torch.equal(host.get(key(i)).view(small_spec.torch_dtype).view(small_spec.block_shape), b)
    with pytest.raises(CapacityError, match="full"):
        host.put(key(9), blocks[0])
    assert host.delete(key(1)) and not host.contains(key(1)) and host.get(key(1)) is None
    host.put(key(9), blocks[2])
    out = torch.empty(small_spec.block_shape, dtype=small_spec.torch_dtype)
    assert torch.equal(host.get(key(9), out), blocks[2])
    assert sorted(host.keys()) == sorted([key(0), key(2), key(9)])


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside:
                fields[head.rstrip(":")] = line.split(":", 1)[1].strip()
    return fields


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages in this kernel")
def test_host_pool_memory_is_on_huge_pages(small_spec):
    # a disk read straight into a slot reaches the disk as one request per 2 MiB of physical memory
    tier = HostTier(small_spec, "8MiB", pin=False)
    address = tier.pool.data.data_ptr()
    eligible = _mapping_of(address).get("THPeligible")
    if eligible is None:
        pytest.skip("this kernel does not tell a mapping's huge page eligibility")
    assert eligible == "1"
    assert address % 4096 == HostTier.page_offset  # still placed where a value's payload starts in its page
    tier.put(key(1), random_block(small_spec, 1))
    assert torch.equal(tier.pool.block(0).view(small_spec.torch_dtype).view(small_spec.block_shape),
                       random_block(small_spec, 1))


@pytest.mark.skipif(_thp_mode() != "madvise", reason="huge pages only where advised tell the opt-out apart")
def test_huge_pages_can_be_turned_off(small_spec, monkeypatch):
    monkeypatch.setenv("KVTIER_HUGE_PAGES", "0")
    tier = HostTier(small_spec, "8MiB", pin=False)
    assert _mapping_of(tier.pool.data.data_ptr()).get("THPeligible", "0") == "0"
    assert tier.pool.data.data_ptr() % 4096 == HostTier.page_offset


def test_capacity_below_one_block_is_an_error(small_spec):
    with pytest.raises(ConfigError, match="smaller than one block"):
        HostTier(small_spec, small_spec.bytes_per_block - 1)
    with pytest.raises(ConfigError, match="not a size"):
        GpuTier(small_spec, "lots")


def test_wrong_block_shape_is_an_error(small_spec):
    host = HostTier(small_spec, "1MiB")
    with pytest.raises(SpecMismatchError, match="expected 8192 bytes"):
        host.put(key(0), torch.zeros(10))


def test_parse_size():
    assert parse_size("64GiB") == 64 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("2TB") == 2 * 10**12
    assert parse_size(4096) == 4096
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("12 parsecs")


def test_slot_table_lowest_first_and_all_or_nothing():
    table = SlotTable(4)
    assert table.allocate_many([key(1), key(2)]) == [0, 1]
    assert table.allocate_many([key(3), key(4), key(5)]) is None
    assert table.free(key(1)) == 0
    assert table.allocate(key(6)) == 0
    assert table.allocate(key(6)) == 0 and len(table) == 2


def test_slot_runs():
    assert slot_runs([3, 4, 5, 9], [0, 1, 7, 8]) == [(0, 3, 0, 2), (2, 5, 7, 1), (3, 9, 8, 1)]
    assert slot_runs([1, 2, 3]) == [(0, 1, 0, 3)]


@pytest.mark.parametrize("num_groups", [1, 2, 4])
def test_move_between_pools_byte_exact(small_spec, num_groups):
    host, gpu = HostTier(small_spec, 8 * small_spec.bytes_per_block), GpuTier(small_spec, 8 * small_spec.bytes_per_block)
    host.pool.data.random_(0, 256)
    transfer = Transferer({TierName.HOST: host, TierName.GPU: gpu})
    try:
        src, dst = [5, 0, 1, 2, 7], [3, 4, 5, 0, 6]
        transfer.move("host", "gpu", [key(i) for i in range(5)], src, dst, num_groups=num_groups).wait(10)
        for s, d in zip(src, dst):
            assert torch.equal(host.pool.data[s], gpu.pool.data[d])
        transfer.move("gpu", "host", [key(0)], [3], [6]).wait(10)
        assert torch.equal(host.pool.data[6], host.pool.data[5])
    finally:
        transfer.close()


def test_load_into_engine_layer_groups(small_spec):
    host = HostTier(small_spec, 4 * small_spec.bytes_per_block)
    gpu = GpuTier(small_spec, 4 * small_spec.bytes_per_block)
    blocks = [random_block(small_spec, i) for i in range(3)]
    host.put(key(0), blocks[0])
    host.put(key(1), blocks[1])
    gpu.put(key(2), blocks[2])
    buffer = Buffer(small_spec, 5)
    transfer = Transferer({TierName.HOST: host, TierName.GPU: gpu})
    try:
        handle = transfer.load([key(0), key(1), key(2)], ["host", "host", "gpu"],
                               [host.slot_of(key(0)), host.slot_of(key(1)), gpu.slot_of(key(2))], buffer, [1, 2, 4],
                               num_groups=2)
        for layer in range(small_spec.num_layers):
            handle.wait_layer(layer, 10)
        handle.wait(10)
        assert handle.failed == ()
        for b, dst in zip(blocks, [1, 2, 4]):
            assert torch.equal(buffer.data[dst], b)
        # layer group order: group 0 of every run before group 1
        assert buffer.writes == [(0, 2), (0, 2), (2, 4), (2, 4)]
    finally:
        transfer.close()


def test_a_load_with_growth_delivers_groups_of_growing_size(small_spec):
    host = HostTier(small_spec, 4 * small_spec.bytes_per_block)
    block = random_block(small_spec, 0)
    host.put(key(0), block)
    buffer = Buffer(small_spec, 2)
    transfer = Transferer({TierName.HOST: host})
    try:
        handle = transfer.load([key(0)], ["host"], [host.slot_of(key(0))], buffer, [1], num_groups=2, growth=3.0)
        handle.wait(10)
        assert handle.layer_groups == ((0, 1), (1, 4)) == tuple(small_spec.layer_groups(2, 3.0))
        assert buffer.writes == [(0, 1), (1, 4)] and torch.equal(buffer.data[1], block)
    finally:
        transfer.close()


def test_save_from_engine(small_spec):
    host = HostTier(small_spec, 4 * small_spec.bytes_per_block)
    buffer = Buffer(small_spec, 3)
    buffer.data.copy_(torch.randn(buffer.data.shape))
    transfer = Transferer({TierName.HOST: host})
    try:
        transfer.save(buffer, [0, 2], [key(0), key(2)], "host", [1, 2]).wait(10)
        assert torch.equal(host.pool.blocks(1, 1)[0], buffer.data[0])
        assert torch.equal(host.pool.blocks(2, 1)[0], buffer.data[2])
    finally:
        transfer.close()


def test_handle_layer_waits_see_only_their_group():
    handle = TransferHandle([key(0)], [(0, 2), (2, 4)])
    handle.group_done(0)
    handle.wait_layer(1, timeout=1)
    assert handle.layer_ready(0) and not handle.layer_ready(3)
    with pytest.raises(TransferTimeout, match="layer 3"):
        handle.wait_layer(3, timeout=0.01)
    handle.finish()
    handle.wait_layer(3, timeout=1)
    assert handle.done()


def test_worker_reports_errors_and_runs_in_priority_order():
    worker = Worker("test")
    gate = threading.Event()
    order: list[str] = []
    try:
        worker.submit(lambda: gate.wait(10))
        worker.submit(lambda: order.append("save"), priority=2)
        worker.submit(lambda: order.append("load"), priority=0)
        failing = worker.submit(lambda: 1 / 0)
        gate.set()
        with pytest.raises(TransferError, match="division"):
            failing.wait(10)
        worker.submit(lambda: None).wait(10)
        assert order == ["load", "save"]
    finally:
        worker.close()


def test_worker_runs_on_start_first_on_its_thread():
    seen = []
    worker = Worker("kvtier-test-start", on_start=lambda: seen.append(threading.current_thread().name))
    try:
        worker.submit(lambda: seen.append("job")).wait(10)
    finally:
        worker.close()
    assert seen == ["kvtier-test-start", "job"]


def test_worker_runs_its_jobs_when_on_start_fails():
    worker = Worker("kvtier-test-start", on_start=lambda: 1 / 0)
    try:
        assert worker.submit(lambda: None).wait(10).done()
    finally:
        worker.close()


def test_transferer_rejects_mixed_specs(small_spec):
    other = small_spec.with_(weights_revision="random-1")
    with pytest.raises(SpecMismatchError, match="different KV specs"):
        Transferer({TierName.HOST: HostTier(small_spec, "1MiB"), TierName.GPU: GpuTier(other, "1MiB")})
