"""The vLLM harness: config checks (no vLLM needed) and one real engine with vLLM's ExampleConnector.

The engine test reproduces the baseline the kvtier connector is measured against: a prompt saved by
ExampleConnector on its first run is restored (all but its last block) on the second, with the same
greedy output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.scheduler.engines.vllm.harness import (
    CPU_BLOCK_TOKENS,
    EngineConfig,
    VllmEngine,
    example_connector,
    interleave,
    kvtier_connector,
    random_prompt,
)
from kvtier.tiers.errors import ClosedError, ConfigError


def vllm_engine_overrides(tmp: Path) -> dict:
    # vLLM's ExampleConnector writing under this module's temporary directory; prefix caching off
    # so a repeated prompt can only be served by the connector.
    return {"max_model_len": 1024, "kv_cache_gib": 0.5, **example_connector(tmp / "example_store")}


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_config_rejects_a_directory_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_dir: .* has no config.json"):
        EngineConfig(model_dir=str(tmp_path))


@pytest.mark.parametrize(("field", "value", "match"), [
    ("kv_role", "kv_sideways", "kv_role: 'kv_sideways' is not one of"),
    ("kv_load_failure_policy", "ignore", "kv_load_failure_policy: 'ignore'"),
    ("kv_cache_gib", 0, "kv_cache_gib: 0 must be positive"),
    ("num_gpu_blocks_override", 0, "num_gpu_blocks_override: 0"),
    ("max_model_len", 8, "max_model_len: 8 is too small"),
    ("reserved_cpus", -1, "reserved_cpus: -1 must be 0 or more"),
    ("max_num_seqs", 0, "max_num_seqs: 0 must be at least 1"),
    ("kv_connector_module_path", "some.module", "kv_connector is not"),
])
def test_config_rejects_bad_values(model_dir: str, field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EngineConfig(model_dir=model_dir, **{field: value})


def test_llm_kwargs_without_connector(model_dir: str) -> None:
    kwargs = EngineConfig(model_dir=model_dir, kv_cache_gib=0.5, num_gpu_blocks_override=48).llm_kwargs()
    assert kwargs["kv_cache_memory_bytes"] == 1 << 29
    assert kwargs["num_gpu_blocks_override"] == 48
    assert kwargs["enable_prefix_caching"] is False
    assert "kv_transfer_config" not in kwargs
    assert "max_num_seqs" not in kwargs and "disable_log_stats" not in kwargs  # vLLM's defaults
    queued = EngineConfig(model_dir=model_dir, max_num_seqs=1, log_stats=True).llm_kwargs()
    assert queued["max_num_seqs"] == 1 and queued["disable_log_stats"] is False


def test_llm_kwargs_with_connectors(model_dir: str, tmp_path: Path) -> None:
    example = EngineConfig(model_dir=model_dir, **example_connector(tmp_path)).llm_kwargs()["kv_transfer_config"]
    assert example == {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                       "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)},
                       "kv_load_failure_policy": "recompute"}
    ours = EngineConfig(model_dir=model_dir, **kvtier_connector(host_bytes="1GiB")).llm_kwargs()["kv_transfer_config"]
    assert ours["kv_connector_module_path"] == "kvtier.scheduler.engines.vllm_connector"
    assert ours["kv_connector_extra_config"] == {"host_bytes": "1GiB"}


def test_random_prompt_is_reproducible_and_in_range() -> None:
    a, b = random_prompt(300, seed=7), random_prompt(300, seed=7)
    assert a == b and len(a) == 300
    assert min(a) >= 100 and max(a) < 40_000
    assert random_prompt(300, seed=8) != a
    with pytest.raises(ConfigError, match="num_tokens: 0"):
        random_prompt(0, seed=1)


def test_interleave_runs_rounds_in_order() -> None:
    calls: list[str] = []
    arms = {"a": lambda i: calls.append(f"a{i}") or float(i), "b": lambda i: calls.append(f"b{i}") or 10.0 + i}
    assert interleave(arms, repeats=2) == {"a": [0.0, 1.0], "b": [10.0, 11.0]}
    assert calls == ["a0", "b0", "a1", "b1"]


def test_engine_not_started_raises(model_dir: str) -> None:
    engine = VllmEngine(EngineConfig(model_dir=model_dir))
    with pytest.raises(ClosedError, match="not started"):
        engine.time_request([1, 2, 3])
    engine.close()  # closing an engine that never started is a no-op


@pytest.mark.vllm
@pytest.mark.slow
def test_example_connector_restores_a_repeated_prompt(vllm_engine: VllmEngine) -> None:
    prompt = random_prompt(3 * CPU_BLOCK_TOKENS + 44, seed=11)
    first = vllm_engine.time_request(prompt, max_tokens=4)
    again = vllm_engine.time_request(prompt, max_tokens=4)
    assert again.output_ids == first.output_ids
    # ExampleConnector restores len(prompt) - 1 aligned down to whole blocks
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 3 * CPU_BLOCK_TOKENS
    assert vllm_engine.startup_s is not None and vllm_engine.startup_s > 0


@pytest.mark.vllm
@pytest.mark.slow
def test_batch_of_prompts_keeps_order(vllm_engine: VllmEngine) -> None:
    prompts = [random_prompt(40, seed=s) for s in (21, 22)]
    together = vllm_engine.generate(prompts, max_tokens=2)
    alone = [vllm_engine.time_request(p, max_tokens=2) for p in prompts]
    assert [r.output_ids for r in together] == [r.output_ids for r in alone]
    assert [r.num_prompt_tokens for r in together] == [40, 40]
