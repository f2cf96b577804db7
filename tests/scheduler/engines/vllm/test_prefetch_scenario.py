"""The prefetch queue scenario of `kvtier bench vllm` in a tiny version, on real vLLM engines: cached
prompts on a cold disk arrive while the engine is busy and wait in its queue; with prefetch on, their
blocks are promoted to host while they wait (coverage > 0, none with prefetch off) and every output is
token-identical to the recomputed one in both arms. Timings are the benchmark's, not asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def test_queued_requests_restore_from_host_with_prefetch(vllm_model_dir: Path, tmp_path: Path) -> None:
    from kvtier.scheduler.bench import vllm_prefetch

    common = {"model_dir": str(vllm_model_dir), "max_model_len": 2048, "kv_cache_gib": 0.5}
    # two cached 4-block prompts queued behind one uncached 3-block prompt, one repeat per arm
    got = vllm_prefetch.run_scenario(common, {"host_bytes": "256MiB", "disk_bytes": "1GiB"}, tmp_path, 1,
                                     prefix_tokens=512, num_cached=2, num_busy=1, busy_tokens=384)
    assert got["prefetch_outputs_match"] is True
    assert got["prefetch_coverage"] > 0
    assert got["prefetch_coverage_off"] == 0  # without prefetch every restored block came from the cold disk
    # the cold disk was cold: a few LMDB pages resident, not the KV (4 blocks of 5.9 MB per prompt)
    assert max(got["prefetch"]["disk_resident_bytes_before"]["on"]) < 4 << 20
