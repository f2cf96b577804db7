"""A host restore into vLLM's paged KV spread over the copier's threads (`VllmKVBuffer.write_chunks`,
`kvbuffer.write_pieces`): every page lands byte for byte where one thread's `write_blocks` puts it. Real host
pool, real tensors shaped like vLLM's CPU cache, real threads; no vLLM engine needed."""

from __future__ import annotations

import random

import pytest
import torch

from kvtier.scheduler.engines.vllm.buffer import VllmKVBuffer
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.pool import HostTier
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName
from kvtier.tiers.transfer import Transferer

# 128 KiB pages, 512 KiB blocks: a 16-block restore (8 MiB) is above the copier's parallel threshold
SPEC = KVSpec(model_id="test/pages", weights_revision="random-0", num_layers=4, num_kv_heads=2, head_dim=64,
              dtype="float32", kv_factor=2, block_tokens=128, layout="vllm-cpu-vec/1")
NUM_BLOCKS = 40


def paged_kv() -> dict[str, torch.Tensor]:
    data = torch.zeros(SPEC.num_layers, NUM_BLOCKS, SPEC.num_kv_heads, SPEC.block_tokens, 2 * SPEC.head_dim)
    return {f"model.layers.{i}.self_attn.attn": data[i] for i in range(SPEC.num_layers)}


@pytest.mark.parametrize("num_groups", [1, 4])
def test_a_host_load_lands_every_page_where_write_blocks_would(num_groups: int) -> None:
    rng = random.Random(num_groups)
    host = HostTier(SPEC, 32 * SPEC.bytes_per_block)
    raw = host.pool.data.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3)))
    transfer = Transferer({TierName.HOST: host})
    try:
        n = 16
        slots = [2, 3, 4, 5] + rng.sample(range(8, 32), n - 4)  # a run of consecutive slots, then scattered ones
        engine_blocks = rng.sample(range(NUM_BLOCKS), n)
        keys = [i.to_bytes(16, "little") for i in range(n)]
        caches = paged_kv()
        kv = VllmKVBuffer(SPEC, caches)
        handle = transfer.load(keys, [TierName.HOST] * n, slots, kv, engine_blocks, num_groups=num_groups)
        handle.wait(30)
        assert handle.failed == () and handle.error is None
        expected = paged_kv()  # the same copy by one thread, page by page
        VllmKVBuffer(SPEC, expected).write_blocks(engine_blocks, host.pool.blocks(0, 32)[slots], (0, SPEC.num_layers))
        for name in caches:
            assert torch.equal(caches[name].view(torch.int32), expected[name].view(torch.int32))  # bytes (NaN != NaN)
        untouched = sorted(set(range(NUM_BLOCKS)) - set(engine_blocks))
        assert all(not caches[name][untouched].any() for name in caches)
    finally:
        transfer.close()


def test_write_chunks_names_one_page_per_layer_and_block_and_checks_ids() -> None:
    caches = paged_kv()
    kv = VllmKVBuffer(SPEC, caches)
    src = torch.empty((2, 2, *SPEC.block_shape[1:]), dtype=torch.float32)
    chunks = kv.write_chunks([7, 1], src, (1, 3))
    assert len(chunks) == 4 and all(size == SPEC.layer_bytes for _, _, size in chunks)
    assert chunks[0][0] == caches["model.layers.1.self_attn.attn"][7].data_ptr()
    with pytest.raises(ConfigError, match=r"vLLM block ids \[40\] outside \[0, 40\)"):
        kv.write_chunks([40], src[:1], (1, 3))
