"""The prefetch queue scenario of `kvtier bench vllm` (`--only prefetch` runs it alone; keys `prefetch_*`).

Requests whose whole prompts (2,048 tokens: 16 blocks) are cached only on a cold disk arrive while a real
vLLM engine (SmolLM2-135M, CPU) is busy with an uncached prompt; `max_num_seqs=1` makes them wait in
vLLM's queue, behind it and behind each other. Two engines with kvtier's connector, identical but for
`"prefetch": true / false`, run the same scenario in interleaved repeats (on, off, off, on, ...), each
repeat on fresh uncached prompts and a truly cold disk (`llm.reset_prefix_cache(reset_connector=True)`:
kvtier's host tier emptied, data.mdb evicted from the page cache and reopened; its residency recorded).

Per request, vLLM's own timestamps (`VllmEngine.run_staged`) give the TTFT from arrival, the queue
wait (arrival to scheduling) and the prefill (scheduling to first token: its restore and the one token
it computes, the part a connector changes); the connector reports how many of its restored blocks were
in host when their load began (`kv_transfer_params`), which is prefetch's coverage of it.

Figures (medians over repeats of per-repeat values, with min-max in `spread`):
- `prefetch_coverage`: share of the cached requests' restored blocks that came from host (on);
- `prefetch_ttft_speedup`: their mean TTFT from arrival, off / on (paired per repeat);
- `prefetch_prefill_speedup`: their mean scheduling-to-first-token time, off / on;
- `prefetch_queue_share_off`: the share of their TTFT (off) spent before their scheduling (the engine
  core's intake, between steps, and the queue): the part no faster restore can shorten;
- `prefetch_ttft_speedup_bound`: what prefetch could at most do to their TTFT from arrival in this run,
  were every cached request's scheduling-to-first-token time zero: off TTFT / (off TTFT - the part of it
  spent in its own prefill and in those of the cached requests ahead of it, which it waits behind), per
  repeat; the rest (the busy prompt, the engine core's intake) no restore can shorten;
- `prefetch_ttft_speedup_same_queue`: off TTFT / (off TTFT - its restore part + the on arm's restore part),
  per repeat: the off arm's queue with the on arm's restores, so the two arms' queue jitter (the busy
  prompt's prefill swings between repeats) drops out; with full coverage the on arm's restore part is
  the least a host prefetch can leave (every request still needs its step: the copy into vLLM's KV and
  the forward of its last token), so this is also the most host prefetch can do in that queue;
- `prefetch_outputs_match`: every output token-identical to the first (recomputed) run's, in both arms.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: tokens of each cached prompt (all cached: a fully cached last block is loaded whole, one token computed)
PREFIX_TOKENS = 2048
#: cached requests arriving together while the engine is busy
NUM_CACHED = 4
#: uncached prompts the engine is busy with when they arrive, and their length
NUM_BUSY = 1
BUSY_TOKENS = 512
#: requests running at once: the rest wait in vLLM's queue
MAX_NUM_SEQS = 1
#: the step's token budget (chunked prefill): vLLM's engine core takes new requests in only between
#: steps, so a busy prompt prefilled in one step would hide the arrivals until it is done; in 128-token
#: steps (~0.3 s each here) they join the queue while it is still being prefilled
STEP_TOKENS = 128


def _engines(common: dict[str, Any], kv_extra: dict[str, Any], work: Path) -> dict[str, Any]:
    from kvtier.scheduler.engines.vllm.harness import EngineConfig, VllmEngine, kvtier_connector

    engines = {}
    for arm, on in (("on", True), ("off", False)):
        extra = dict(kv_extra, disk_path=str(work / f"prefetch_{arm}_store"), prefetch=on)
        engines[arm] = VllmEngine(EngineConfig(**common, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=STEP_TOKENS,
                                               log_stats=True, **kvtier_connector(**extra)))
    return engines


def _make_cold(engine: Any, store: Path, seed: int) -> int:
    """Empties the engine's host tier, reopens its disk store cold; returns data.mdb's resident bytes."""
    from kvtier.scheduler.engines.vllm.harness import random_prompt
    from kvtier.tiers.coldcache import resident_bytes
    from kvtier.tiers.disk.store import DiskTier

    assert engine.llm.reset_prefix_cache(reset_connector=True), "reset_prefix_cache refused"
    engine.time_request(random_prompt(16, seed), max_tokens=1)  # ships the cold-reopen order
    return resident_bytes(DiskTier.data_file_of(store))


def run_scenario(common: dict[str, Any], kv_extra: dict[str, Any], work: Path, repeats: int, *,
                 prefix_tokens: int = PREFIX_TOKENS, num_cached: int = NUM_CACHED, num_busy: int = NUM_BUSY,
                 busy_tokens: int = BUSY_TOKENS) -> dict[str, Any]:
    """Runs the scenario (module docstring) and returns its figures.

    Args:
        common: `EngineConfig` fields shared with the rest of the benchmark (model, lengths, KV space).
        kv_extra: kvtier's connector config without `disk_path` and `prefetch` (set per arm here).
        work: a directory for the two arms' disk stores.
        repeats: interleaved repeats per arm.
        prefix_tokens, num_cached, num_busy, busy_tokens: the scenario's shape (the test runs a tiny one).
    """
    from kvtier.scheduler.bench import common as bu
    from kvtier.scheduler.engines.vllm.harness import random_prompt

    engines = _engines(common, kv_extra, work)
    cached = [random_prompt(prefix_tokens, seed=7_000 + k) for k in range(num_cached)]
    per: dict[str, dict[str, list[Any]]] = {arm: {"ttft": [], "intake": [], "queued": [], "prefill": [],
                                                  "restore_part": [], "coverage": [],
                                                  "resident": []} for arm in engines}
    matches = True
    try:
        for engine in engines.values():
            engine.start()
        # the first run computes every cached prompt (the reference outputs) and saves it: host, then disk
        reference = {arm: [r.output_ids for r in engine.generate(cached, max_tokens=1)]
                     for arm, engine in engines.items()}
        matches = reference["on"] == reference["off"]
        order = list(engines)
        for r in range(repeats):
            for i, arm in enumerate(order if r % 2 == 0 else order[::-1]):
                engine = engines[arm]
                per[arm]["resident"].append(_make_cold(engine, work / f"prefetch_{arm}_store", 90_000 + 10 * r + i))
                busy = [random_prompt(busy_tokens, seed=80_000 + 100 * r + 10 * i + b) for b in range(num_busy)]
                got = engine.run_staged(busy, cached, max_tokens=1)[num_busy:]
                per[arm]["ttft"].append(statistics.fmean(g.ttft_s for g in got))
                # arrival (client) to the engine core's queue: it takes requests in between steps only
                per[arm]["intake"].append(statistics.fmean(g.ttft_s - g.queued_s - g.prefill_s for g in got))
                per[arm]["queued"].append(statistics.fmean(g.queued_s for g in got))
                per[arm]["prefill"].append(statistics.fmean(g.prefill_s for g in got))
                # request k (max_num_seqs=1, first come first served) waits for the prefills of cached requests
                # 1..k-1, then runs its own: the part of its TTFT a faster restore shortens
                per[arm]["restore_part"].append(statistics.fmean(
                    sum(g.prefill_s for g in got[:k + 1]) for k in range(len(got))))
                restored = sum((g.kv_transfer_params or {}).get("kvtier", {}).get("restored_blocks", 0) for g in got)
                ready = sum((g.kv_transfer_params or {}).get("kvtier", {}).get("ready_blocks", 0) for g in got)
                per[arm]["coverage"].append(ready / restored if restored else 0.0)
                matches &= [g.output_ids for g in got] == reference[arm]
                log.info("prefetch scenario, repeat %d, %s: ttft %.3f s (queued %.3f, prefill %.3f), coverage %.2f",
                         r, arm, per[arm]["ttft"][-1], per[arm]["queued"][-1], per[arm]["prefill"][-1],
                         per[arm]["coverage"][-1])
    finally:
        for engine in engines.values():
            engine.close()
    on, off = per["on"], per["off"]
    ttft_ratios = [f / n for f, n in zip(off["ttft"], on["ttft"])]
    prefill_ratios = [f / n for f, n in zip(off["prefill"], on["prefill"])]
    queue_share = [(t - p) / t for p, t in zip(off["prefill"], off["ttft"])]
    bound = [t / (t - r) for t, r in zip(off["ttft"], off["restore_part"])]
    same_queue = [t / (t - r + n) for t, r, n in zip(off["ttft"], off["restore_part"], on["restore_part"])]
    out: dict[str, Any] = {
        "prefix_tokens": prefix_tokens, "num_cached": num_cached, "num_busy": num_busy, "busy_tokens": busy_tokens,
        "max_num_seqs": MAX_NUM_SEQS, "step_tokens": STEP_TOKENS, "repeats": repeats,
        **{f"{arm}_{k}_s": [round(x, 4) for x in v[k]] for arm, v in per.items()
           for k in ("ttft", "intake", "queued", "prefill", "restore_part")},
        "on_coverage": [round(x, 4) for x in on["coverage"]], "off_coverage": [round(x, 4) for x in off["coverage"]],
        "disk_resident_bytes_before": {arm: v["resident"] for arm, v in per.items()},
    }
    result: dict[str, Any] = {
        "prefetch": out,
        "prefetch_coverage": round(statistics.median(on["coverage"]), 4),
        "prefetch_coverage_off": round(statistics.median(off["coverage"]), 4),
        "prefetch_ttft_speedup": round(statistics.median(ttft_ratios), 3),
        "prefetch_prefill_speedup": round(statistics.median(prefill_ratios), 3),
        "prefetch_queue_share_off": round(statistics.median(queue_share), 3),
        "prefetch_ttft_speedup_bound": round(statistics.median(bound), 3),
        "prefetch_ttft_speedup_same_queue": round(statistics.median(same_queue), 3),
        "prefetch_ttft_on_s": round(statistics.median(on["ttft"]), 4),
        "prefetch_ttft_off_s": round(statistics.median(off["ttft"]), 4),
        "prefetch_outputs_match": bool(matches),
    }
    for key, values, digits in (("prefetch_coverage", on["coverage"], 4), ("prefetch_ttft_speedup", ttft_ratios, 3),
                                ("prefetch_prefill_speedup", prefill_ratios, 3),
                                ("prefetch_queue_share_off", queue_share, 3),
                                ("prefetch_ttft_speedup_bound", bound, 3),
                                ("prefetch_ttft_speedup_same_queue", same_queue, 3)):
        bu.note_spread(result, key, values, digits)  # `spread`: merged into the benchmark's own
    return result
