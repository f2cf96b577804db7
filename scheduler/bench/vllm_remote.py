"""The remote arm of `kvtier bench vllm`: a second vLLM engine restoring a 2k-token prompt from the remote
tier, against recomputing it.

On a 3-master Redis Cluster started on loopback for the run: engine A (kvtier with the remote, its own
disk) computes a fresh 2,048-token prompt and writes its blocks through to the cluster; engine B (kvtier
with the same remote, its own empty host and disk tiers) then serves the same prompt: its TTFT is a
remote restore (probe, promotion remote -> host, load). The limit is engine `none` (no connector)
computing the same prompt. Each repeat uses a new prompt (so B never has it locally); the three requests
of a repeat run in turn, and `remote_speedup_2k` is the median of none / B over the repeats, with min-max.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROMPT_TOKENS = 2048
#: seconds for engine A's write-through to land before engine B asks (background saves settle)
SETTLE_S = 1.0


def redis_available() -> bool:
    """Whether redis-server and redis-py are here (the arm is skipped otherwise)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def remote_speedup(common: dict[str, Any], kv_extra: dict[str, Any], work: Path, repeats: int) -> dict[str, Any]:
    """Runs the arm (module docstring); returns its figures and samples."""
    from kvtier.scheduler.engines.vllm.harness import EngineConfig, VllmEngine, kvtier_connector, random_prompt
    from kvtier.tiers.remote.local import LocalRedis

    repeats = max(3, repeats)
    out: dict[str, Any] = {"prompt_tokens": PROMPT_TOKENS, "repeats": repeats, "remote": "local 3-master cluster"}
    with LocalRedis(3) as cluster:
        remote = {"remote_url": cluster.url, "remote_timeout_s": 5.0}
        none = VllmEngine(EngineConfig(**common))
        first = VllmEngine(EngineConfig(**common, **kvtier_connector(**kv_extra, **remote,
                                                                     disk_path=str(work / "remote_a"))))
        second = VllmEngine(EngineConfig(**common, **kvtier_connector(**kv_extra, **remote,
                                                                      disk_path=str(work / "remote_b"))))
        samples: dict[str, list[float]] = {"none": [], "remote": []}
        cached, same = [], True
        try:
            for engine in (none, first, second):
                engine.start()
            for r in range(repeats):
                prompt = random_prompt(PROMPT_TOKENS, seed=70_000 + r)
                computed = first.time_request(prompt, max_tokens=1)
                first.time_request(random_prompt(16, seed=80_000 + r), max_tokens=1)  # ships the write-through
                time.sleep(SETTLE_S)
                samples["none"].append(none.time_request(prompt, max_tokens=1).latency_s)
                restored = second.time_request(prompt, max_tokens=1)
                samples["remote"].append(restored.latency_s)
                cached.append(restored.num_cached_tokens or 0)
                same &= restored.output_ids == computed.output_ids
        finally:
            for engine in (none, first, second):
                engine.close()
    ratios = [n / m for n, m in zip(samples["none"], samples["remote"])]
    out.update({f"{k}_samples_s": [round(x, 4) for x in v] for k, v in samples.items()})
    out.update(none_s=round(statistics.median(samples["none"]), 4),
               remote_s=round(statistics.median(samples["remote"]), 4),
               speedup=round(statistics.median(ratios), 3), speedup_min=round(min(ratios), 3),
               speedup_max=round(max(ratios), 3), restored_tokens=cached, same_output=bool(same))
    log.info("remote arm: %s", out)
    return out
