"""kvtier's vLLM connector in vLLM's CUDA build: greedy outputs equal to recomputing, from host, from a
cold disk and after a restart on the same store.

Runs where CUDA and a CUDA build of vLLM are installed (skipped otherwise: the CPU build's tests are
beside this one). vLLM's own prefix cache is off, so a repeated prompt is served only by the connector
(`num_cached_tokens` says how much it served). Engines take a fifth of the GPU each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.scheduler.engines.vllm.harness import EngineConfig, VllmEngine, kvtier_connector, random_prompt

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.timeout(900)]

MAX_TOKENS = 4
COMMON = {"max_model_len": 2048, "kv_cache_gib": 0.5, "gpu_memory_utilization": 0.2, "reserved_cpus": None}
PROMPTS = {"first": random_prompt(700, seed=81), "second": random_prompt(1030, seed=82)}


def outputs(engine: VllmEngine) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """Each prompt's greedy output and the tokens the connector served for it."""
    result = {}
    for name, prompt in PROMPTS.items():
        timing = engine.time_request(prompt, max_tokens=MAX_TOKENS)
        result[name] = (timing.output_ids, timing.num_cached_tokens)
    return result


def test_connector_on_cuda_restores_exactly_from_host_disk_and_after_a_restart(vllm_model_dir: Path, tmp_path):
    with VllmEngine(EngineConfig(model_dir=str(vllm_model_dir), **COMMON)) as reference:
        want = {name: out for name, (out, _) in outputs(reference).items()}
    store = tmp_path / "store"
    config = EngineConfig(model_dir=str(vllm_model_dir), **COMMON,
                          **kvtier_connector(host_bytes="256MiB", disk_bytes="1GiB", disk_path=str(store)))
    with VllmEngine(config) as engine:
        # first pass: computed and saved
        assert {n: out for n, (out, _) in outputs(engine).items()} == want
        # again: served from the host tier
        again = outputs(engine)
        assert {n: out for n, (out, _) in again.items()} == want
        assert all(cached for _, cached in again.values()), again
        # the host tier emptied, the disk store reopened cold: served from disk
        assert engine.llm.reset_prefix_cache(reset_connector=True)
        cold = outputs(engine)
        assert {n: out for n, (out, _) in cold.items()} == want
        assert all(cached for _, cached in cold.values()), cold
    # a new engine on the same store: the disk tier's blocks are found again
    with VllmEngine(config) as restarted:
        after = outputs(restarted)
        assert {n: out for n, (out, _) in after.items()} == want
        assert all(cached for _, cached in after.values()), after
