"""The LMCache arm of `kvtier bench vllm`: the server's config checks (no LMCache needed), a real LMCache
server started and stopped, and the arm on a small prompt beside an engine without a connector.

The real-server tests skip cleanly when the `lmcache` extra (or vLLM) is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.scheduler.bench.lmcache_server import (
    CHUNK_TOKENS,
    GIB,
    LMCacheServer,
    LMCacheServerConfig,
    lmcache_available,
)
from kvtier.scheduler.bench.vllm_lmcache import CHECK_TOKENS, LMCacheArm, compare
from kvtier.scheduler.engines.vllm.harness import VllmEngine, random_prompt
from kvtier.tiers.errors import ClosedError, ConfigError

needs_lmcache = pytest.mark.skipif(not lmcache_available(), reason="lmcache is not installed (the `lmcache` extra)")

# the engine without a connector (the recompute reference), shared by the module
vllm_engine_overrides = {"max_model_len": 1024, "kv_cache_gib": 0.5}


def test_config_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="l1_bytes=0"):
        LMCacheServerConfig(l2_dir=tmp_path, log_path=tmp_path / "log", l1_bytes=0)
    with pytest.raises(ConfigError, match="chunk_tokens: 8 is too small"):
        LMCacheServerConfig(l2_dir=tmp_path, log_path=tmp_path / "log", chunk_tokens=8)


def test_argv_sizes_match_kvtiers_tiers(tmp_path: Path) -> None:
    argv = LMCacheServerConfig(l2_dir=tmp_path / "l2", log_path=tmp_path / "log", l1_bytes=GIB,
                               l2_bytes=4 * GIB).argv(5001, 5002, "shm-x")
    opt = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1, 2)}
    assert opt["--chunk-size"] == str(CHUNK_TOKENS) == "256"
    assert float(opt["--l1-size-gb"]) == 1.0
    assert (opt["--port"], opt["--http-port"], opt["--shm-name"]) == ("5001", "5002", "shm-x")
    l2 = json.loads(opt["--l2-adapter"])
    assert l2 == {"type": "fs_native", "base_path": str(tmp_path / "l2"), "max_capacity_gb": 4.0,
                  "eviction": {"eviction_policy": "LRU"}}


def test_server_not_started_refuses_requests(tmp_path: Path) -> None:
    server = LMCacheServer(LMCacheServerConfig(l2_dir=tmp_path / "l2", log_path=tmp_path / "log"))
    with pytest.raises(ClosedError, match="LMCache server is not running"):
        server.clear_l1()
    server.close()  # closing a server that never started is a no-op


@needs_lmcache
@pytest.mark.slow
def test_server_starts_serves_and_stops(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "server.log"
    server = LMCacheServer(LMCacheServerConfig(l2_dir=tmp_path / "l2", log_path=log_path))
    with server:
        status = server.status()
        assert status["chunk_size"] == CHUNK_TOKENS
        assert status["storage_manager"]["l1_manager"]["memory_total_bytes"] == GIB
        assert server.clear_l1() == 0
        assert server.wait_stored() == 0  # nothing stored yet
        assert server.held_l2_files() == []
    # stopped: no process, no shared memory segment left, the log kept
    assert not (Path("/dev/shm") / server.shm_name).exists()
    assert "Uvicorn running on" in log_path.read_text()
    with pytest.raises(ClosedError):
        server.status()


@needs_lmcache
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_arm_restores_from_dram_and_cold_disk_like_recompute(vllm_engine: VllmEngine, vllm_model_dir: Path,
                                                             tmp_path: Path) -> None:
    prompt = random_prompt(2 * CHUNK_TOKENS, seed=31)
    arm = LMCacheArm({"model_dir": str(vllm_model_dir), **vllm_engine_overrides}, tmp_path,
                     tmp_path / "server.log", "1GiB", "4GiB")
    try:
        arm.start()
        # first run: recomputed, then stored (L1, and both chunks written to L2)
        first = arm.seed(prompt)
        assert len(arm.server.l2_files()) == 2
        # one round: a DRAM restore, then L1 emptied + L2 evicted, then a cold L2 restore
        arm.round(prompt)
        row: dict = {}
        arm.finish_size(row, vllm_engine, prompt)
    finally:
        arm.close()
    assert first == tuple(row["lmcache_check_tokens"]["recompute"][:1])
    assert row["lmcache_same_output"], row["lmcache_check_tokens"]
    assert len(row["lmcache_check_tokens"]["lmcache"]) == CHECK_TOKENS
    assert row["lmcache_disk_resident_bytes_before"] == [0]  # truly cold before the disk restore
    assert row["lmcache_host_s"] > 0 and row["lmcache_disk_s"] > 0
    # the floor engine found the whole prompt in vLLM's own cache (one token computed, nothing restored)
    assert row["floor_all_cached"] and row["floor_s"] > 0
    compare(row, {"none": [1.0], "kvtier_host": [0.5], "kvtier_disk": [0.5]})
    assert row["vs_lmcache_host"] == round(row["lmcache_host_s"] / 0.5, 3)
    assert row["vs_lmcache_host_bound"] == round(row["lmcache_host_s"] / row["floor_s"], 3)
    assert row["kvtier_host_vs_floor"] == round(0.5 / row["floor_s"], 3)
    assert "Uvicorn running on" in (tmp_path / "server.log").read_text()
