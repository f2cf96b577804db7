"""Fixtures for the transformers engine tests: a tiny random-weight Llama (no download, built from a
config: 4 layers, hidden 64, 4 heads, 2 KV heads, vocab 256, float32, seeded) and its KVSpec."""

from __future__ import annotations

import pytest

TINY_SEED = 0
TINY_BLOCK_TOKENS = 16


@pytest.fixture(scope="session")
def tiny_llama():
    """The tiny Llama in float32 with eager attention (the setting that keeps restores bitwise exact)."""
    pytest.importorskip("transformers")
    from kvtier.scheduler.engines.models import build_random_llama

    return build_random_llama(seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_llama_spec(tiny_llama):
    """Its KVSpec: 16-token blocks, weights_revision `random-0`."""
    from kvtier.scheduler.engines.hf.kv import spec_for_model

    return spec_for_model(tiny_llama, f"random-{TINY_SEED}", block_tokens=TINY_BLOCK_TOKENS)
