"""GPU promotion on request (`OffloadConfig.prefetch_gpu`) through the OffloadManager on real tiers: the
gpu tier is kvtier's own pool (a `GpuTier` in CPU memory here, as without CUDA), the host a real pool,
the disk real LMDB in a tmp dir. Queued requests' host blocks are copied into free GPU slots only, never
evicting anything; a load then reads them from the GPU, byte-exact."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.manager import OffloadManager
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.kvbuffer import BlockKVBuffer
from kvtier.tiers.spec import KVSpec
from managerutil import MODEL, tiny_spec


@pytest.fixture
def spec() -> KVSpec:
    return tiny_spec()


def config(spec: KVSpec, tmp_path, *, gpu: int, prefetch_gpu: bool) -> OffloadConfig:
    b = spec.bytes_per_block
    return OffloadConfig(gpu_bytes=gpu * b, host_bytes=8 * b, disk_bytes=32 * b, disk_path=str(tmp_path / "store"),
                         prefetch_gpu=prefetch_gpu)


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, n).astype(np.int32)


def engine_with_kv(spec: KVSpec, num_blocks: int, seed: int) -> BlockKVBuffer:
    buf = BlockKVBuffer(spec, num_blocks)
    buf.data.copy_(torch.randn(buf.data.shape, generator=torch.Generator().manual_seed(seed)))
    return buf


def save_to_disk(spec: KVSpec, cfg: OffloadConfig, prompt: np.ndarray, src: BlockKVBuffer) -> None:
    """Saves `prompt`'s blocks (written through to disk), then closes: a new manager finds them on disk only."""
    with OffloadManager(spec, cfg.with_(gpu_bytes=0, prefetch=False, prefetch_gpu=False), model_config=MODEL) as m:
        m.store("seed", prompt, src).wait(10)
        m.flush()


def queue_behind_a_long_prefill(m: OffloadManager, prompt: np.ndarray, tier: str, count: int) -> dict:
    """Queues an uncached 16k-token prompt, then "b" behind it (so "b" waits and is promoted); waits until
    `count` blocks sit in `tier`, or 2 s of flushes; returns the stats."""
    m.enqueue("x", tokens(16384, 9))
    m.enqueue("b", prompt)
    reached = threading.Event()
    for _ in range(200):
        m.flush()
        if m.stats()["blocks_by_tier"][tier] >= count:
            reached.set()
            break
        reached.wait(0.01)
    m.flush()
    return m.stats()


def restore_b(m: OffloadManager, prompt: np.ndarray, num_blocks: int) -> tuple[BlockKVBuffer, int]:
    """Restores every matched block of the queued "b" (split 0) into a fresh buffer."""
    m.cancel("x")
    plan = replace(m.plan("b"), split=0)
    plan = replace(plan, restore_stop=plan.num_found_blocks)
    dst = BlockKVBuffer(m.spec, num_blocks)
    good = m.load("b", dst, plan).wait()
    m.finish("b")
    return dst, good


def test_host_blocks_of_a_queued_request_are_promoted_into_free_gpu_slots(spec, tmp_path):
    cfg = config(spec, tmp_path, gpu=4, prefetch_gpu=True)
    prompt, src = tokens(64, 4), engine_with_kv(spec, 4, 4)
    save_to_disk(spec, cfg, prompt, src)
    with OffloadManager(spec, cfg, model_config=MODEL) as m:
        # "b" waits behind a long prefill: its 3 restorable disk blocks go to host, then on to the empty GPU
        st = queue_behind_a_long_prefill(m, prompt, "gpu", 3)
        assert st["blocks_by_tier"]["gpu"] == 3 and st["gpu_prefetched_blocks"] == 3
        assert st["gpu_prefetch_moves"] == 1  # one batched move host -> gpu
        assert st["demoted_blocks"] == 0 and st["dropped_blocks"] == 0  # nothing evicted for it
        dst, good = restore_b(m, prompt, 4)
        assert good == 4 and torch.equal(dst.data, src.data)
        st = m.stats()
        assert st["hit_blocks_by_tier"]["gpu"] == 3 and st["gpu_prefetch_used_blocks"] == 3
        assert st["gpu_prefetch_evicted_unused_blocks"] == 0 and st["double_reads"] == 0


def test_only_free_gpu_slots_are_filled(spec, tmp_path):
    cfg = config(spec, tmp_path, gpu=2, prefetch_gpu=True)
    prompt, src = tokens(64, 5), engine_with_kv(spec, 4, 5)
    save_to_disk(spec, cfg, prompt, src)
    with OffloadManager(spec, cfg, model_config=MODEL) as m:
        # 3 blocks reach host, 2 GPU slots are free: 2 are promoted, nothing is evicted
        st = queue_behind_a_long_prefill(m, prompt, "gpu", 2)
        assert st["blocks_by_tier"] == {"gpu": 2, "host": 3, "disk": 4}
        assert st["gpu_prefetched_blocks"] == 2 and st["demoted_blocks"] == 0 and st["dropped_blocks"] == 0
        dst, good = restore_b(m, prompt, 4)
        assert good == 4 and torch.equal(dst.data, src.data)
        assert m.stats()["gpu_prefetch_used_blocks"] == 2


def test_a_full_gpu_tier_is_never_evicted_for_a_promotion(spec, tmp_path):
    cfg = config(spec, tmp_path, gpu=2, prefetch_gpu=True)
    prompt, src = tokens(64, 6), engine_with_kv(spec, 4, 6)
    save_to_disk(spec, cfg, prompt, src)
    with OffloadManager(spec, cfg, model_config=MODEL) as m:
        other = tokens(32, 7)
        m.store("c", other, engine_with_kv(spec, 2, 7)).wait(10)  # the GPU tier is full with "c"
        m.finish("c")
        st = queue_behind_a_long_prefill(m, prompt, "host", 3)
        assert st["blocks_by_tier"]["host"] == 3 and st["prefetched_blocks"] == 3  # disk -> host as usual
        assert st["gpu_prefetch_moves"] == 0 and st["gpu_prefetched_blocks"] == 0
        assert m.lookup(other) == 32 and st["blocks_by_tier"]["gpu"] == 2  # "c" still there
        assert all(m.decider.index.get(k).best_tier.value == "gpu" for k in m.keys(other))
        dst, good = restore_b(m, prompt, 4)
        assert good == 4 and torch.equal(dst.data, src.data)


def test_off_by_default(spec, tmp_path):
    cfg = config(spec, tmp_path, gpu=4, prefetch_gpu=False)
    assert OffloadConfig().prefetch_gpu is False
    prompt, src = tokens(64, 8), engine_with_kv(spec, 4, 8)
    save_to_disk(spec, cfg, prompt, src)
    with OffloadManager(spec, cfg, model_config=MODEL) as m:
        st = queue_behind_a_long_prefill(m, prompt, "host", 3)
        assert st["blocks_by_tier"]["host"] == 3 and st["blocks_by_tier"]["gpu"] == 0
        assert st["gpu_prefetch_moves"] == 0


def test_config_needs_a_gpu_pool_a_host_tier_and_prefetch():
    with pytest.raises(ConfigError, match="prefetch_gpu: .*gpu_bytes=0"):
        OffloadConfig(host_bytes="1GiB", prefetch_gpu=True)
    with pytest.raises(ConfigError, match="prefetch_gpu: .*prefetch=False"):
        OffloadConfig(gpu_bytes="1GiB", host_bytes="1GiB", prefetch=False, prefetch_gpu=True)
    with pytest.raises(ConfigError, match="prefetch_gpu: .*host_bytes=0"):
        OffloadConfig(gpu_bytes="1GiB", host_bytes=0, prefetch_gpu=True)
