"""Shared fixtures: small real KV specs and tiers in temp dirs; the `gpu` marker skips without CUDA."""

from __future__ import annotations

import pytest

from kvtier.tiers.spec import KVSpec


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def small_spec() -> KVSpec:
    """A tiny fp32 geometry: 4 layers, 2 KV heads, head_dim 8, 16-token blocks (8 KiB per block)."""
    return KVSpec(model_id="test/tiny", num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32",
                  block_tokens=16, weights_revision="random-0")
