"""The LMCache arm of `kvtier bench vllm`: LMCache 0.5.6 side by side with kvtier in the same vLLM.

LMCache runs in its multiprocess mode (its in-process connector cannot start on a CPU-only host): an
`LMCacheServer` (L1 in DRAM, L2 on disk with `fs_native`, 256-token chunks, sizes equal to kvtier's host
and disk tiers) started by the benchmark, and one vLLM engine with `LMCacheMPConnector`. The arm joins the
benchmark's interleaved rounds:
- per prompt size, each round adds `lmcache_host` (restored from LMCache's DRAM) and `lmcache_disk` (L1
  emptied, every L2 file evicted from the page cache and its residency recorded, then restored from L2);
  `vs_lmcache_host` / `vs_lmcache_disk` are the per-round ratios LMCache / kvtier, medians over rounds;
- outputs are compared token by token with recompute: every timed LMCache request's token with the
  prompt's first (recomputed) answer, and once per size `CHECK_TOKENS` greedy tokens after a DRAM restore
  with the same tokens from the engine without a connector;
- the miss overhead (unique prompts, nothing cached) at 2,048 tokens joins the benchmark's own rotation;
  at the other sizes `miss_rounds` runs none / kvtier / LMCache in rotation on unique prompts;
- the multi-turn chat gets an LMCache engine beside vLLM alone and vLLM + kvtier (a fresh server);
- the floor under every connector: a vLLM engine with its own prefix cache and no connector answers the
  prompt plus one token, every prompt token found in its cache (one token computed, nothing restored), in
  the same rounds (`floor_s`). `vs_lmcache_host_bound` / `vs_lmcache_disk_bound` (LMCache / floor, per
  round) are the most any connector could beat LMCache by in this engine; `kvtier_host_vs_floor` is how
  far kvtier's host restore is from that floor.

Primitives: `add_arguments`, `wanted` (the arm runs when lmcache is installed, unless `--no-lmcache`),
`LMCacheArm` (server + engine: `start`, `seed`, `round`, `finish_size`, `close`), `compare`,
`miss_rounds`, `overhead`, `summarize`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from kvtier.scheduler.bench.lmcache_server import LMCacheServer, LMCacheServerConfig, lmcache_available
from kvtier.tiers.tier import parse_size

log = logging.getLogger(__name__)

#: greedy tokens compared with recompute once per prompt size
CHECK_TOKENS = 8
#: seconds between two miss-overhead requests (background work of the last one settles)
SETTLE_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--no-lmcache` and `--lmcache-logs` for `kvtier bench vllm`."""
    parser.add_argument("--no-lmcache", action="store_true", help="leave out the LMCache arm (it runs when the "
                        "`lmcache` extra is installed)")
    parser.add_argument("--lmcache-logs", default=None, help="directory for the LMCache server logs (default: "
                        "beside the --json file, else ./kvtier-bench-lmcache-logs)")


def wanted(args: argparse.Namespace) -> bool:
    """Whether this run has an LMCache arm (logs why not)."""
    if getattr(args, "no_lmcache", False):
        return False
    if not lmcache_available():
        log.warning("LMCache arm skipped: lmcache is not installed (pip install 'kvtier[lmcache]')")
        return False
    return True


def log_dir(args: argparse.Namespace) -> Path:
    """Where the server logs are kept: `--lmcache-logs`, else beside `--json`, else ./kvtier-bench-lmcache-logs."""
    if getattr(args, "lmcache_logs", None):
        return Path(args.lmcache_logs)
    if getattr(args, "json", None):
        return Path(args.json).resolve().parent
    return Path.cwd() / "kvtier-bench-lmcache-logs"


def _med(values: list[float]) -> float:
    return statistics.median(values)


class LMCacheArm:
    """An LMCache server and the vLLM engine that uses it, sized like kvtier's tiers.

    Args:
        engine_fields: `EngineConfig` fields shared with the other arms (model, context, KV space, ...).
        work: a scratch directory (the L2 directory goes under it).
        log_path: the server's log file.
        host_bytes, disk_bytes: kvtier's host and disk tier sizes (sizes such as "1GiB" accepted), used as
            LMCache's L1 and L2 sizes.
    """

    def __init__(self, engine_fields: dict[str, Any], work: Path, log_path: Path, host_bytes: int | str,
                 disk_bytes: int | str) -> None:
        self.server = LMCacheServer(LMCacheServerConfig(
            l2_dir=work / "lmcache_l2", log_path=log_path, l1_bytes=parse_size(host_bytes, "host_bytes"),
            l2_bytes=parse_size(disk_bytes, "disk_bytes")))
        self._engine_fields = engine_fields
        self.engine: Any = None
        self.floor: Any = None  # vLLM's own prefix cache, no connector: restores that cost nothing
        self._seed_output: tuple[int, ...] = ()
        self._samples: dict[str, list[float]] = {}
        self._resident: list[int] = []
        self._same = self._floor_hit = True

    def start(self) -> LMCacheArm:
        """Starts the server, then the engine, then the floor engine; returns self."""
        from kvtier.scheduler.engines.vllm.harness import EngineConfig, VllmEngine

        self.server.start()
        self.engine = VllmEngine(EngineConfig(**self._engine_fields, **self.server.connector_fields()))
        self.engine.start()
        self.floor = VllmEngine(EngineConfig(**{**self._engine_fields, "enable_prefix_caching": True}))
        self.floor.start()
        return self

    def close(self) -> None:
        """Stops the engines, then the server (which keeps its log); idempotent."""
        engines, self.engine, self.floor = (self.engine, self.floor), None, None
        try:
            for engine in engines:
                if engine is not None:
                    engine.close()
        finally:
            self.server.close()

    @property
    def startup_s(self) -> dict[str, float | None]:
        return {"server": self.server.startup_s, "engine": None if self.engine is None else self.engine.startup_s}

    def seed(self, prompt: list[int]) -> tuple[int, ...]:
        """Runs `prompt` once (recomputed, then stored by LMCache) and the floor's prompt once (into vLLM's
        own cache); starts a new size's samples."""
        self._seed_output = self.engine.time_request(prompt, max_tokens=1).output_ids
        self.server.wait_stored()
        self.floor.time_request(_floor_prompt(prompt), max_tokens=1)
        self._samples = {"lmcache_host": [], "lmcache_disk": [], "floor": []}
        self._resident, self._same, self._floor_hit = [], True, True
        return self._seed_output

    def round(self, prompt: list[int]) -> None:
        """One interleaved round: the floor, a DRAM restore, then a cold L2 restore (residency recorded
        before it)."""
        floor = self.floor.time_request(_floor_prompt(prompt), max_tokens=1)
        self._samples["floor"].append(floor.latency_s)
        self._floor_hit &= floor.num_cached_tokens == len(prompt)
        host = self.engine.time_request(prompt, max_tokens=1)
        self._samples["lmcache_host"].append(host.latency_s)
        self._resident.append(self.server.make_l2_cold())
        disk = self.engine.time_request(prompt, max_tokens=1)
        self._samples["lmcache_disk"].append(disk.latency_s)
        self._same &= host.output_ids == disk.output_ids == self._seed_output
        self._same &= bool(host.num_cached_tokens) and bool(disk.num_cached_tokens)

    def finish_size(self, row: dict[str, Any], none: Any, prompt: list[int]) -> None:
        """Adds a size's LMCache columns to `row`, after comparing `CHECK_TOKENS` greedy tokens after a DRAM
        restore with recompute (`none`: the engine without a connector)."""
        ref = none.time_request(prompt, max_tokens=CHECK_TOKENS).output_ids
        restored = self.engine.time_request(prompt, max_tokens=CHECK_TOKENS)
        same_tokens = restored.output_ids == ref and bool(restored.num_cached_tokens)
        for key, values in self._samples.items():
            row[f"{key}_s"] = round(_med(values), 4)
            row[f"{key}_samples_s"] = [round(x, 4) for x in values]
        row["lmcache_disk_resident_bytes_before"] = self._resident
        row["lmcache_l2_files"] = len(self.server.l2_files())
        row["lmcache_same_output"] = bool(self._same and same_tokens)
        row["floor_all_cached"] = bool(self._floor_hit)  # every floor request found the whole prompt cached
        row["lmcache_check_tokens"] = {"recompute": list(ref), "lmcache": list(restored.output_ids)}


def _floor_prompt(prompt: list[int]) -> list[int]:
    """The prompt plus one token: vLLM's prefix cache then holds every token of `prompt` (whole blocks, the
    sizes are multiples of its block) and computes one, where a connector's restore leaves at least one."""
    return [*prompt, prompt[-1]]


def compare(row: dict[str, Any], samples: dict[str, list[float]]) -> None:
    """Adds the per-round ratios to a size's row: LMCache / kvtier (host, disk), recompute / LMCache, and
    the bounds LMCache / floor with kvtier's host restore / floor.

    Args:
        row: a row `LMCacheArm.finish_size` filled (its `*_samples_s`).
        samples: the same rounds' `none`, `kvtier_host` and `kvtier_disk` samples.
    """
    theirs = {k: row[f"{k}_samples_s"] for k in ("lmcache_host", "lmcache_disk")}
    floor = row["floor_samples_s"]
    for tier in ("host", "disk"):
        lmc = theirs[f"lmcache_{tier}"]
        row[f"vs_lmcache_{tier}"] = round(_med([t / o for t, o in zip(lmc, samples[f"kvtier_{tier}"])]), 3)
        row[f"lmcache_{tier}_speedup"] = round(_med([n / t for n, t in zip(samples["none"], lmc)]), 3)
        row[f"vs_lmcache_{tier}_bound"] = round(_med([t / f for t, f in zip(lmc, floor)]), 3)
    row["kvtier_host_vs_floor"] = round(_med([k / f for k, f in zip(samples["kvtier_host"], floor)]), 3)


def miss_rounds(arms: list[tuple[str, Any]], size: int, rounds: int, seed: int) -> dict[str, list[float]]:
    """TTFT of unique `size`-token prompts (nothing cached) on each arm, the order rotating each round.

    Returns:
        arm name -> its samples; arms[0] is the reference (no connector).
    """
    from kvtier.scheduler.engines.vllm.harness import random_prompt

    out: dict[str, list[float]] = {name: [] for name, _ in arms}
    for r in range(rounds):
        for i, (name, engine) in enumerate(arms[r % len(arms):] + arms[:r % len(arms)]):
            time.sleep(SETTLE_S)  # the last engine's background saves settle before the next timed request
            prompt = random_prompt(size, seed=seed + 10 * r + i)
            out[name].append(engine.time_request(prompt, max_tokens=1).latency_s)
    return out


def overhead(samples: dict[str, list[float]], name: str) -> float:
    """Median over rounds of `name`'s TTFT / no connector's - 1."""
    return round(_med([x / n - 1 for x, n in zip(samples[name], samples["none"])]), 4)


def summarize(result: dict[str, Any]) -> None:
    """The headline keys: vs_lmcache_host_2k, vs_lmcache_disk_2k, vs_lmcache_multiturn, lmcache_outputs_match,
    and the floor's: vs_lmcache_host_bound_2k, vs_lmcache_disk_bound_2k, kvtier_host_vs_floor_2k."""
    rows = result["ttft"]
    two = rows["2048"]
    result["vs_lmcache_host_2k"] = two["vs_lmcache_host"]
    result["vs_lmcache_disk_2k"] = two["vs_lmcache_disk"]
    result["lmcache_outputs_match"] = all(r["lmcache_same_output"] for r in rows.values())
    for key in ("vs_lmcache_host_bound", "vs_lmcache_disk_bound", "kvtier_host_vs_floor"):
        result[f"{key}_2k"] = two[key]
    multiturn = result.get("multiturn") or {}
    if "lmcache_mean_s" in multiturn:
        result["vs_lmcache_multiturn"] = round(multiturn["lmcache_mean_s"] / multiturn["kvtier_mean_s"], 3)
    if "lmcache_vs_ideal" in multiturn:  # the most any connector could reach: LMCache / free restores
        result["vs_lmcache_multiturn_bound"] = multiturn["lmcache_vs_ideal"]
