"""The split-invariant chunked attention: bitwise exact restores, and the same results as eager."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from kvtier.scheduler.engines.hf.attention import exact_attention  # noqa: E402
from kvtier.scheduler.engines.hf.kv import HFKVBuffer, spec_for_model  # noqa: E402
from kvtier.scheduler.engines.hf.generate import greedy_generate, prefill  # noqa: E402
from kvtier.scheduler.engines.models import build_random_llama  # noqa: E402
from kvtier.tiers.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.transformers


@pytest.fixture(scope="module")
def chunked_llama():
    return build_random_llama(seed=0, attn_implementation=exact_attention(16))


def test_registering_twice_gives_the_same_name():
    assert exact_attention(16) == exact_attention(16) == "kvtier_exact_16"
    with pytest.raises(ConfigError, match="chunk_tokens: expected a positive int, got 0"):
        exact_attention(0)


def test_matches_eager_attention(chunked_llama, tiny_llama):
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(7))
    got, _ = prefill(chunked_llama, ids)
    want, _ = prefill(tiny_llama, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(greedy_generate(chunked_llama, ids, None, 6), greedy_generate(tiny_llama, ids, None, 6))


@pytest.mark.parametrize(("prompt_tokens", "prefix_tokens"), [(150, 16), (150, 128), (83, 64), (300, 32)])
def test_restore_at_any_chunk_multiple_is_bitwise_exact(chunked_llama, prompt_tokens, prefix_tokens):
    model = chunked_llama
    spec = spec_for_model(model, "random-0", block_tokens=16)
    ids = torch.randint(0, 256, (prompt_tokens,), generator=torch.Generator().manual_seed(prompt_tokens))
    full, cache = prefill(model, ids)
    n = prefix_tokens // 16
    blocks = torch.empty((n, *spec.block_shape))
    HFKVBuffer.from_cache(cache, spec).read_blocks(range(n), blocks, (0, spec.num_layers))
    buffer = HFKVBuffer.allocate(spec, prefix_tokens)
    buffer.write_blocks(range(n), blocks, (0, spec.num_layers))
    got, _ = prefill(model, ids[prefix_tokens:], buffer.to_cache())
    assert torch.equal(got, full)
