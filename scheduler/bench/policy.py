"""`kvtier bench policy`: is `auto` at least as good as the best classic policy on every trace and capacity?

Matrix: the shared Mooncake trace at 2,000 / 6,000 / 20,000 blocks, and the built-in `chat`, `agents`
and `docqa` workloads (`--requests` each, seeds `--seeds`) at 2% / 5% / 20% of their unique blocks.
Every cell replays LRU, ARC, S3-FIFO, `auto` and the bound `opt` (hit-only, block-weighted, no warm-up);
the built-in cells also replay `auto` with the workloads' retention hints (session, continues).

Figures (JSON):
- `min_margin_vs_best_classic`: min over the matrix of auto minus the best of lru / arc / s3fifo;
- `shared_trace_gain_2k`: auto minus the best classic on the shared trace at 2,000 blocks;
- `gap_closed_2k`: that gain over (opt minus the best classic) at 2,000 blocks;
- `hint_gain`: auto with hints minus auto without, mean over the built-in cells; `hint_gain_chat`,
  the same over the chat cells;
- `cells`: every cell's ratios; `auto_vs_lru_time_ratio`: hit-only replay time of auto over that of
  lru on the shared trace at 2,000 blocks: the median over `--repeats` interleaved repeats (lru, auto,
  lru, auto, ...) of each repeat's ratio, with their min-max (`auto_vs_lru_time_ratio_range`), every
  repeat's seconds (`lru_s`, `auto_s`) and the load average. The times are this process's CPU time:
  a hit-only replay is single-threaded computation, and on a shared machine its wall time also counts
  the time the OS gave other processes (at load 7-19 on 2 CPUs single repeats swung 0.15-0.9 s); the
  wall-time ratio is reported beside it (`auto_vs_lru_wall_ratio`, `_range`, `lru_wall_s`, `auto_wall_s`).
Hit ratios are deterministic (the machine's load changes only the seconds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

from kvtier.tiers.errors import ConfigError

SHARED_CAPACITIES = (2000, 6000, 20000)
FRACTIONS = (0.02, 0.05, 0.2)
CLASSICS = ("lru", "arc", "s3fifo")
KINDS = ("chat", "agents", "docqa")

#: what a forked worker inherits: workload name -> HitOnlyWorkload (with and without hints)
_WORK: dict[str, Any] = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=None,
                        help="the shared Mooncake trace (default: experiments/traces/mooncake_conversation_trace.jsonl)")
    parser.add_argument("--requests", type=int, default=2000, help="requests of each built-in workload (default 2000)")
    parser.add_argument("--seeds", default="0,1", help="seeds of the built-in workloads (default 0,1)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of auto and lru, interleaved (default 5)")


def _run_cell(task: tuple[str, str, int, bool]) -> tuple[str, str, int, bool, float, float]:
    from kvtier.scheduler.replay.hitonly import run_policy

    name, policy, capacity, hints = task
    work = _WORK[(name, hints)]
    result = run_policy(work, policy, capacity)
    return name, policy, capacity, hints, result.block_hit_ratio, result.seconds


def _prepare(trace: str, requests: int, seeds: list[int], quick: bool) -> dict[str, list[int]]:
    """Builds the workloads (into `_WORK`, before forking) and returns each one's capacities."""
    from kvtier.scheduler.replay import traces, workloads
    from kvtier.scheduler.replay.hitonly import HitOnlyWorkload

    caps: dict[str, list[int]] = {}
    shared = traces.read_trace(trace).requests
    _WORK[("shared", False)] = HitOnlyWorkload.from_requests(shared)
    caps["shared"] = [SHARED_CAPACITIES[0]] if quick else list(SHARED_CAPACITIES)
    for kind in KINDS:
        for seed in seeds:
            reqs = workloads.generate(kind, requests, seed)
            unique = len({k for r in reqs for k in (r.block_ids or ())})
            name = f"{kind}-{seed}"
            _WORK[(name, False)] = HitOnlyWorkload.from_requests(reqs)
            _WORK[(name, True)] = HitOnlyWorkload.from_requests(reqs, hints=True)
            caps[name] = [max(1, round(unique * f)) for f in FRACTIONS]
    return caps


def _timing(repeats: int) -> dict[str, Any]:
    """lru then auto, `repeats` times: each run's CPU time of this process and its wall time."""
    from kvtier.scheduler.replay.hitonly import run_policy

    work = _WORK[("shared", False)]
    capacity = SHARED_CAPACITIES[0]
    cpu: dict[str, list[float]] = {"lru": [], "auto": []}
    wall: dict[str, list[float]] = {"lru": [], "auto": []}
    for _ in range(repeats):
        for policy in ("lru", "auto"):
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            run_policy(work, policy, capacity)
            cpu[policy].append(time.process_time() - start_cpu)
            wall[policy].append(time.perf_counter() - start_wall)
    ratios = [a / b for a, b in zip(cpu["auto"], cpu["lru"]) if b > 0]
    wall_ratios = [a / b for a, b in zip(wall["auto"], wall["lru"])]
    return {"auto_vs_lru_time_ratio": round(statistics.median(ratios), 3),
            "auto_vs_lru_time_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "auto_vs_lru_wall_ratio": round(statistics.median(wall_ratios), 3),
            "auto_vs_lru_wall_ratio_range": [round(min(wall_ratios), 3), round(max(wall_ratios), 3)],
            "lru_s": [round(t, 3) for t in cpu["lru"]], "auto_s": [round(t, 3) for t in cpu["auto"]],
            "lru_wall_s": [round(t, 3) for t in wall["lru"]], "auto_wall_s": [round(t, 3) for t in wall["auto"]],
            "timing_cache_blocks": capacity, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def run(args: argparse.Namespace) -> int:
    from kvtier.scheduler.bench import common as bu
    from kvtier.scheduler.replay.traces import MOONCAKE_TRACE

    trace = args.trace or str(MOONCAKE_TRACE)
    if not Path(trace).is_file():
        raise ConfigError(f"--trace: {trace}: no such file")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: {args.seeds!r}; expected comma-separated ints") from None
    if not seeds or args.requests < 1 or args.jobs < 1 or args.repeats < 1:
        raise ConfigError("--seeds, --requests, --jobs and --repeats must be non-empty and >= 1")
    start_s = time.perf_counter()
    caps = _prepare(trace, args.requests, seeds[:1] if args.quick else seeds, args.quick)
    tasks = []
    for name, capacities in caps.items():
        for c in capacities:
            tasks += [(name, p, c, False) for p in (*CLASSICS, "auto", "opt")]
            if name != "shared":
                tasks.append((name, "auto", c, True))
    tasks.sort(key=lambda t: t[1] not in ("auto", "opt"))  # the slow ones first: better balance
    if args.jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            done = pool.map(_run_cell, tasks, chunksize=1)
    else:
        done = [_run_cell(t) for t in tasks]
    ratio = {(n, p, c, h): r for n, p, c, h, r, _ in done}
    cells, margins, hint_gains, chat_gains = [], [], [], []
    for name, capacities in caps.items():
        for c in capacities:
            best_name = max(CLASSICS, key=lambda p: ratio[(name, p, c, False)])
            best, auto, opt = ratio[(name, best_name, c, False)], ratio[(name, "auto", c, False)], ratio[(name, "opt", c, False)]
            cell = {"workload": name, "cache_blocks": c, **{p: round(ratio[(name, p, c, False)], 4) for p in CLASSICS},
                    "auto": round(auto, 4), "opt": round(opt, 4), "best_classic": best_name,
                    "margin": round(auto - best, 4),
                    "gap_closed": round((auto - best) / (opt - best), 4) if opt > best else None}
            margins.append(auto - best)
            if name != "shared":
                gain = ratio[(name, "auto", c, True)] - auto
                cell["auto_hints"] = round(ratio[(name, "auto", c, True)], 4)
                cell["hint_gain"] = round(gain, 4)
                hint_gains.append(gain)
                if name.startswith("chat"):
                    chat_gains.append(gain)
            cells.append(cell)
    shared_2k = next(c for c in cells if c["workload"] == "shared" and c["cache_blocks"] == SHARED_CAPACITIES[0])
    results: dict[str, Any] = {
        "machine": bu.machine(), "trace": trace, "requests": args.requests, "seeds": seeds,
        "min_margin_vs_best_classic": round(min(margins), 4),
        "shared_trace_gain_2k": shared_2k["margin"], "gap_closed_2k": shared_2k["gap_closed"],
        "hint_gain": round(statistics.mean(hint_gains), 4) if hint_gains else None,
        "hint_gain_chat": round(statistics.mean(chat_gains), 4) if chat_gains else None,
        "cells": cells,
    }
    if not args.quick:
        results.update(_timing(args.repeats))
    results["seconds"] = round(time.perf_counter() - start_s, 1)
    bu.print_table(cells, ["workload", "cache_blocks", *CLASSICS, "auto", "opt", "margin", "gap_closed", "hint_gain"],
                   "hit-only block hit ratio: auto against the best classic, and the bound opt")
    print(f"min margin vs best classic {results['min_margin_vs_best_classic']:+.4f}; shared trace @2k gain "
          f"{results['shared_trace_gain_2k']:+.4f} ({results['gap_closed_2k']} of the gap to opt); hint gain "
          f"{results['hint_gain']} (chat {results['hint_gain_chat']})")
    if "auto_vs_lru_time_ratio" in results:
        print(f"auto / lru hit-only time on the shared trace @2k: {results['auto_vs_lru_time_ratio']} "
              f"(CPU time, median of {args.repeats} interleaved repeats, min-max {results['auto_vs_lru_time_ratio_range']}; "
              f"wall {results['auto_vs_lru_wall_ratio']}, {results['auto_vs_lru_wall_ratio_range']}; "
              f"load {results['loadavg']})")
    bu.write_json(args.json, results)
    return 0
