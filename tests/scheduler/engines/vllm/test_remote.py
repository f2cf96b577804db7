"""Two vLLM engines, one after the other, with separate host and disk tiers, share a 2k-token prompt
through the remote tier on a real 3-master Redis Cluster: the second restores it from the remote and its
greedy output is token-identical to the first's (which computed it).

One module, two engines (each start costs 30-60 s here); vLLM's own prefix cache is off, so the second
engine's `num_cached_tokens` counts only what kvtier restored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.scheduler.engines.vllm.harness import CPU_BLOCK_TOKENS, EngineConfig, VllmEngine, kvtier_connector, random_prompt

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

B = CPU_BLOCK_TOKENS
PROMPT = random_prompt(2000, seed=210)
MAX_TOKENS = 4


def _engine(model_dir: Path, disk: Path, url: str) -> VllmEngine:
    extra = {"host_bytes": "256MiB", "disk_bytes": "512MiB", "disk_path": str(disk), "remote_url": url,
             "remote_timeout_s": 5.0}
    return VllmEngine(EngineConfig(model_dir=str(model_dir), max_model_len=2048 + 64, kv_cache_gib=0.5,
                                   **kvtier_connector(**extra)))


def test_second_engine_restores_a_2k_prompt_from_the_remote(vllm_model_dir, redis_cluster, tmp_path) -> None:
    # the first engine computes the prompt (nothing cached anywhere) and writes its blocks through to the remote
    with _engine(vllm_model_dir, tmp_path / "disk-a", redis_cluster.url) as first:
        computed = first.generate([PROMPT], max_tokens=MAX_TOKENS)[0]
    assert (computed.num_cached_tokens or 0) == 0
    # the second engine has an empty host tier and its own empty disk: only the remote holds the prompt
    with _engine(vllm_model_dir, tmp_path / "disk-b", redis_cluster.url) as second:
        restored = second.generate([PROMPT], max_tokens=MAX_TOKENS)[0]
    assert restored.output_ids == computed.output_ids
    assert restored.num_cached_tokens == (len(PROMPT) // B) * B
