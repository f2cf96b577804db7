"""`kvtier bench scheduler`: lookup + plan of a 128k-token request against an index of 1M blocks.

What is timed (keys already computed at enqueue; hashing is the foundation's figure, not in this one):
- `lookup_plan_ms`: `Decider.plan(request_id)` of an enqueued request: the index prefix walk over its
  2,048 keys (64 tokens per block) giving each matched block's fastest tier as a code
  (`Index.prefix_codes`), and the planner's restore-vs-recompute choice over them: the path
  `OffloadManager.plan(request_id)` takes. Median of repeats, with min, p90 and max.
- the parts, for diagnosis: `lookup_ms` (`Decider.lookup(keys)`: the entries), `codes_ms`
  (`Index.prefix_codes(keys)`), `plan_ms` (`Planner.plan(codes, num_tokens)` alone) and
  `lookup_then_plan_ms` (`Decider.lookup` then `Decider.plan`, as an engine that asks for the hit length
  first calls them).

Setup (not timed): an index of `--index-blocks` entries spread over gpu, host and disk (the request's
blocks: a quarter gpu, a quarter host, half disk, interleaved in runs), built with `Index.add`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

TARGET_MS = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-blocks", type=int, default=1_000_000, help="entries in the index (default 1M)")
    parser.add_argument("--request-tokens", type=int, default=128 * 1024,
                        help="prompt tokens of the request (default 131072)")
    parser.add_argument("--block-tokens", type=int, default=64, help="tokens per block (default 64)")
    parser.add_argument("--repeats", type=int, default=200, help="timed repeats per figure (default 200)")
    parser.add_argument("--model", default="llama-3-8b", help="model preset of the cost model (default llama-3-8b)")
    parser.add_argument("--profile", default="h100-sxm", help="hardware profile of the cost model (default h100-sxm)")


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 5) -> tuple[float, float, float, float]:
    """(median, min, p90, max) of `repeats` timed calls, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return (statistics.median(times) * 1e3, times[0] * 1e3, times[int(0.9 * (len(times) - 1))] * 1e3,
            times[-1] * 1e3)


def build(index_blocks: int, request_blocks: int, block_tokens: int, model: str, profile: str,
          seed: int = 0) -> tuple[Any, list[bytes]]:
    """A Decider whose index holds `index_blocks` entries, `request_blocks` of them the request's prefix.

    Returns:
        (decider, the request's keys).
    """
    import numpy as np

    from kvtier.tiers.errors import ConfigError
    from kvtier.tiers.spec import KVSpec
    from kvtier.tiers.tier import TierName

    from kvtier.scheduler.config import OffloadConfig
    from kvtier.scheduler.cost.model import CostModel
    from kvtier.scheduler.decider import Decider
    from kvtier.scheduler.planner import Planner

    if index_blocks < request_blocks:
        raise ConfigError(f"--index-blocks: {index_blocks} is fewer than the request's {request_blocks} blocks")
    spec = KVSpec.from_preset(model, block_tokens=block_tokens)
    cost = CostModel.from_profile(profile, model, spec=spec)
    gib = 1 << 30
    config = OffloadConfig(gpu_bytes=16 * gib, host_bytes=64 * gib, disk_bytes=1 << 40, disk_path="unused")
    decider = Decider(spec, config, planner=Planner(cost))
    rng = np.random.default_rng(seed)
    raw = rng.bytes(16 * index_blocks)
    keys = [raw[i:i + 16] for i in range(0, 16 * index_blocks, 16)]
    tiers = (TierName.GPU, TierName.HOST, TierName.DISK)
    codes = rng.integers(0, 3, index_blocks)
    # the request's prefix: runs of 64 blocks cycling gpu, host, disk, disk (a quarter, a quarter, half)
    codes[:request_blocks] = [(0, 1, 2, 2)[(i // 64) % 4] for i in range(request_blocks)]
    add = decider.index.add
    for i, key in enumerate(keys):
        tier = tiers[codes[i]]
        add(key, tier, -1 if tier is TierName.DISK else i, i % 2048, None)
    return decider, keys[:request_blocks]


def run(args: argparse.Namespace) -> int:
    from kvtier.tiers.errors import ConfigError

    from kvtier.scheduler.bench import common as bu

    if args.quick:
        args.index_blocks, args.repeats = min(args.index_blocks, 100_000), min(args.repeats, 50)
    for name in ("index_blocks", "request_tokens", "block_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    request_blocks = args.request_tokens // args.block_tokens
    began = time.perf_counter()
    decider, keys = build(args.index_blocks, request_blocks, args.block_tokens, args.model, args.profile)
    setup_s = time.perf_counter() - began
    n = args.request_tokens
    decider.enqueue("bench", keys, n)
    planner = decider.planner
    entries = decider.lookup(keys)
    codes = decider.index.prefix_codes(keys)
    plan = decider.plan("bench")

    # every timed plan is computed afresh: the planner's memo of recent plans would answer a repeat
    figures = {
        "lookup_plan_ms": _median_ms(lambda: (planner.forget(), decider.plan("bench")), args.repeats),
        "lookup_ms": _median_ms(lambda: decider.lookup(keys), args.repeats),
        "codes_ms": _median_ms(lambda: decider.index.prefix_codes(keys), args.repeats),
        "plan_ms": _median_ms(lambda: (planner.forget(), planner.plan(codes, n)), args.repeats),
        "lookup_then_plan_ms": _median_ms(lambda: (decider.lookup(keys), planner.forget(), decider.plan("bench")),
                                          args.repeats),
    }
    results: dict[str, Any] = {name: round(med, 4) for name, (med, *_) in figures.items()}
    results.update({
        "target_ms": TARGET_MS, "index_blocks": len(decider.index), "request_tokens": n,
        "request_blocks": request_blocks, "block_tokens": args.block_tokens, "matched_blocks": len(entries),
        "repeats": args.repeats, "model": args.model, "profile": args.profile, "setup_s": round(setup_s, 2),
        "spread_ms": {name: {"min": round(lo, 4), "p90": round(hi, 4), "max": round(top, 4)}
                      for name, (_, lo, hi, top) in figures.items()},
        "spread": {name: {"median": round(med, 4), "min": round(lo, 4), "max": round(top, 4), "n": args.repeats}
                   for name, (med, lo, _, top) in figures.items()},
        "plan": {"split": plan.split, "restore_stop": plan.restore_stop, "total_s": plan.total_s,
                 "recompute_all_s": plan.recompute_all_s, "restored_by_tier":
                 {str(t): c for t, c in plan.restored_by_tier}},
        "hashing": "not included (keys computed at enqueue; see `kvtier bench tiers` hash_128k_ms)",
        "machine": bu.machine(),
    })
    rows = [{"figure": name, "median_ms": results[name], **{f"{k}_ms": v for k, v in results["spread_ms"][name].items()}}
            for name in figures]
    bu.print_table(rows, ["figure", "median_ms", "min_ms", "p90_ms", "max_ms"],
                   f"kvtier bench scheduler: {request_blocks} keys ({n} tokens) against {len(decider.index)} "
                   f"indexed blocks, {args.repeats} repeats (target lookup_plan_ms <= {TARGET_MS})")
    print(f"\nsetup {setup_s:.1f} s; plan: {plan.explain().splitlines()[0] if plan.explain() else ''}")
    print(f"machine: {results['machine']}")
    bu.write_json(args.json, results)
    return 0
