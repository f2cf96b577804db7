"""CUDA paths of the tiers: pinned pools, batched host<->gpu copies, layer-group loads with events, disk->gpu.

Every test carries the `gpu` marker (skipped without CUDA, see tests/conftest.py); `make gpu-check` runs
them on a machine with a GPU (docs/gpu.md says what such a run must show).
"""

from __future__ import annotations

import random

import pytest
import torch

from kvtier.tiers.disk import DiskTier
from kvtier.tiers.pool import GpuTier, HostTier
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName
from kvtier.tiers.kvbuffer import BlockKVBuffer
from kvtier.tiers.transfer import Transferer

pytestmark = pytest.mark.gpu

#: cycles of `torch.cuda._sleep` that hold a stream for tens of milliseconds on any current GPU
SLOW_CYCLES = 50_000_000


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def spec() -> KVSpec:
    """4 layers, 2 KV heads, head_dim 64, 16-token blocks, fp16 (64 KiB per block)."""
    return KVSpec(model_id="test/gpu", num_layers=4, num_kv_heads=2, head_dim=64, dtype="float16",
                  block_tokens=16, weights_revision="random-0")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes seen as fp16 hold NaNs, which `torch.equal` calls unequal)."""
    return torch.equal(a.cpu().contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))


def fill(pool_data: torch.Tensor, seed: int) -> None:
    gen = torch.Generator(device=pool_data.device).manual_seed(seed)
    pool_data.copy_(torch.randint(0, 256, pool_data.shape, dtype=torch.uint8, generator=gen,
                                  device=pool_data.device))


def test_host_pool_is_pinned_and_gpu_pool_is_on_the_device_and_both_are_released(spec):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        host, gpu = HostTier(spec, 64 * spec.bytes_per_block), GpuTier(spec, 64 * spec.bytes_per_block)
        assert host.pool.pinned and host.pool.data.is_pinned() and host.device.type == "cpu"
        assert gpu.device.type == "cuda" and gpu.pool.data.is_cuda
        assert torch.cuda.memory_allocated() - before >= 64 * spec.bytes_per_block
        del host, gpu
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # every gpu pool went back to the caching allocator


@pytest.mark.parametrize("num_groups", [1, 4], ids=["whole-blocks", "layer-groups"])
@pytest.mark.parametrize("order", ["shuffled", "reversed"])
def test_batched_host_gpu_copies_are_byte_exact_both_ways(spec, num_groups, order):
    n = 48
    host, gpu = HostTier(spec, n * spec.bytes_per_block), GpuTier(spec, n * spec.bytes_per_block)
    fill(host.pool.data, 1)
    host_slots, gpu_slots = list(range(n)), list(range(n))
    if order == "shuffled":
        random.Random(0).shuffle(host_slots)
        random.Random(1).shuffle(gpu_slots)
    else:
        gpu_slots.reverse()
    keys = [key(i) for i in range(n)]
    transfer = Transferer({"host": host, "gpu": gpu})
    try:
        # host -> gpu: each block lands in its own slot
        handle = transfer.move("host", "gpu", keys, host_slots, gpu_slots, num_groups=num_groups)
        handle.wait(30)
        assert not handle.failed
        assert torch.equal(gpu.pool.data[gpu_slots].cpu(), host.pool.data[host_slots])
        # gpu -> host into other slots: the same bytes come back
        back = list(reversed(host_slots))
        fill(gpu.pool.data, 2)
        transfer.move("gpu", "host", keys, gpu_slots, back, num_groups=num_groups).wait(30)
        assert torch.equal(host.pool.data[back], gpu.pool.data[gpu_slots].cpu())
    finally:
        transfer.close()


class SlowGpuBuffer(BlockKVBuffer):
    """An engine KV on the GPU whose writes of layer groups after the first start behind a long kernel on
    the transfer stream: the copies of groups 1.. land tens of milliseconds after they were issued."""

    def write_blocks(self, dst_blocks, src, layers):
        if layers[0] > 0:
            torch.cuda._sleep(SLOW_CYCLES)  # on the current stream: the transfer stream
        super().write_blocks(dst_blocks, src, layers)


def test_layer_group_load_never_reports_a_group_before_its_bytes_landed(spec):
    n = 16
    host = HostTier(spec, n * spec.bytes_per_block)
    fill(host.pool.data, 3)
    buffer = SlowGpuBuffer(spec, n, device="cuda")
    keys = [key(i) for i in range(n)]
    transfer = Transferer({"host": host})
    try:
        handle = transfer.load(keys, [TierName.HOST] * n, list(range(n)), buffer, list(range(n)),
                               num_groups=spec.num_layers)
        want = host.pool.blocks(0, n)  # [n, layers, 2, heads, T, dim]
        for layer in range(spec.num_layers):
            handle.wait_layer(layer, 30)
            # read on the default stream right after the wait: stale bytes here would mean the group was
            # reported before the (slow) transfer stream had written it
            assert same_bytes(buffer.data[:, layer], want[:, layer]), f"layer {layer} read before it landed"
        handle.wait(30)
    finally:
        transfer.close()


def test_save_waits_for_the_kernels_queued_before_it(spec):
    # the "model" writes the engine KV on the default stream behind a long kernel, then saves at once:
    # the transfer stream must wait for that write (an event), not copy the old bytes
    n = 8
    host = HostTier(spec, n * spec.bytes_per_block)
    buffer = BlockKVBuffer(spec, n, device="cuda")
    fresh = torch.randn(buffer.data.shape, generator=torch.Generator().manual_seed(4)).to(spec.torch_dtype)
    fresh_gpu = fresh.cuda()
    torch.cuda.synchronize()
    transfer = Transferer({"host": host})
    try:
        torch.cuda._sleep(SLOW_CYCLES)
        buffer.data.copy_(fresh_gpu, non_blocking=True)
        transfer.save(buffer, list(range(n)), [key(i) for i in range(n)], TierName.HOST, list(range(n))).wait(30)
        assert torch.equal(host.pool.blocks(0, n), fresh)
    finally:
        transfer.close()


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_disk_to_gpu_restores_are_byte_exact(spec, tmp_path, codec):
    n = 12
    disk = DiskTier(tmp_path / "kv", spec, 64 * spec.bytes_per_block, codec=codec)
    gpu = GpuTier(spec, n * spec.bytes_per_block)
    host = HostTier(spec, n * spec.bytes_per_block)
    blocks = [torch.randn(spec.block_shape, generator=torch.Generator().manual_seed(i)).to(spec.torch_dtype)
              for i in range(n)]
    keys = [key(i) for i in range(n)]
    disk.put_async(keys, [b.view(torch.uint8).reshape(-1) for b in blocks]).wait(30)
    transfer = Transferer({"gpu": gpu, "host": host, "disk": disk})
    try:
        slots = list(reversed(range(n)))
        handle = transfer.move("disk", "gpu", keys, (), slots)
        handle.wait(30)
        assert not handle.failed
        for b, slot in zip(blocks, slots):
            assert torch.equal(gpu.pool.blocks(slot, 1)[0].cpu(), b)
        # straight into an engine KV on the GPU, through the booked host slots
        buffer = BlockKVBuffer(spec, n, device="cuda")
        load = transfer.load(keys, [TierName.DISK] * n, list(range(n)), buffer, slots, num_groups=2)
        load.wait(30)
        assert not load.failed
        for b, slot in zip(blocks, slots):
            assert torch.equal(buffer.data[slot].cpu(), b)
    finally:
        transfer.close()
        disk.close()
