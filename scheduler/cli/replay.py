"""`kvtier replay TRACE`: what would kvtier do for this traffic?

Modes:
- `--hit-only`: prefix hit ratios for each `--cache-blocks` capacity and `--policy` (default `auto`),
  with the infinite-cache and `opt` bounds (`kvtier.scheduler.replay.hitonly`); seconds for a whole trace.
- default: the discrete-event simulation (`kvtier.scheduler.cli.simulate.run_simulation`);
  `--real` runs the same trace through the real tiers.

TRACE is a trace file (Mooncake JSONL, kvtier JSONL, Azure CSV, or `.gz` of one) or the name of a
built-in workload (`chat`, `agents`, `docqa`: `--requests` of them with the seed of `--seed`), or `mooncake`
(the public Mooncake conversation trace shipped in `experiments/traces/`);
without TRACE, the `chat` workload.
Exit status: 0 done, 2 bad input (the message names the file, line and what was wrong).
Neither the hit-only nor the simulation path imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kvtier.tiers.errors import ConfigError


def _ints(text: str, name: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        mult = 1
        if part[-1] in "kK":
            part, mult = part[:-1], 1000
        try:
            value = int(part) * mult
        except ValueError:
            raise ConfigError(f"{name}: {text!r}; expected comma-separated ints (e.g. 2000,6000,20000)") from None
        if value < 1:
            raise ConfigError(f"{name}: {value}; expected ints >= 1")
        out.append(value)
    if not out:
        raise ConfigError(f"{name}: {text!r}; expected at least one int")
    return out


from kvtier.scheduler.cli.simulate import DEMO_REQUESTS, DEMO_WORKLOAD


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a request trace (hit-only, simulated, or through the real tiers)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", metavar="TRACE", nargs="?", default=None,
                   help="trace file (.jsonl, .csv, .gz), `mooncake` (the shipped Mooncake conversation trace) or a "
                        "built-in workload: chat, agents, docqa (default: chat)")
    p.add_argument("--format", choices=("mooncake", "kvtier", "azure-csv"), default=None,
                   help="trace format (default: detected)")
    p.add_argument("--skip-bad", action="store_true", help="count and skip malformed records instead of failing")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    p.add_argument("--seed", type=int, default=0, help="seed of a built-in workload (default 0)")
    p.add_argument("--requests", type=int, default=None, help="requests of a built-in workload (default 2000)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="worker processes (default: the CPU count, at most 4 for --hit-only, 2 for a simulation)")
    hit = p.add_argument_group("hit-only mode")
    hit.add_argument("--hit-only", action="store_true", help="hit ratios only (no timing model)")
    hit.add_argument("--cache-blocks", default="20000", metavar="N[,N...]",
                     help="cache capacities in blocks, comma-separated (default 20000)")
    hit.add_argument("--policy", default="auto", metavar="P[,P...]",
                     help="policies, comma-separated: auto, fifo, lru, arc, s3fifo, prefix-aware, cost-aware, "
                          "suffix-arc, and the offline opt, belady, min (default auto)")
    hit.add_argument("--weight", choices=("blocks", "tokens"), default="blocks",
                     help="count each hit as one block, or as its tokens (kvcache-simulator) (default blocks)")
    hit.add_argument("--warmup-fraction", type=float, default=0.0, metavar="F",
                     help="measure only the last 1-F of the requests (kvcache-simulator: 0.5) (default 0)")
    hit.add_argument("--bounds", default="opt", metavar="B[,B...]",
                     help="bound and references at each capacity: opt (the bound), belady, min (references), "
                          "or none (default opt; infinite always)")
    hit.add_argument("--hints", action="store_true",
                     help="give auto the trace's retention hints (session, continues, priority)")
    sim = p.add_argument_group("simulation mode (default) and --real")
    sim.add_argument("--gpu", default=None, help="gpu tier capacity (bytes like 16GiB, or blocks like 2000b)")
    sim.add_argument("--host", default=None, help="host tier capacity")
    sim.add_argument("--disk", default=None, help="disk tier capacity")
    sim.add_argument("--remote", default=None, metavar="CAPACITY",
                     help="a remote tier shared by replicas, below the disk (simulation: the server's capacity under "
                     "its LRU; --real: needs --remote-url)")
    sim.add_argument("--remote-url", default=None, metavar="URL",
                     help="--real: a live Redis / Redis Cluster for the remote tier (redis://, redis+cluster://)")
    sim.add_argument("--model", default="llama-3-8b", help="model preset (default llama-3-8b)")
    sim.add_argument("--hardware", default="h100-sxm", help="hardware profile (default h100-sxm)")
    sim.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                     help="prefetch queued requests' blocks (default on)")
    sim.add_argument("--time-scale", default="auto", help="stretch inter-arrival times: a factor or 'auto' (load 0.7)")
    sim.add_argument("--block-tokens", type=int, default=None, help="kvtier block size (default: the trace's block)")
    sim.add_argument("--real", action="store_true", help="replay through the real tiers (real LMDB, real bytes)")
    sim.add_argument("--disk-path", default=None, help="disk store directory for --real (default: a temp dir)")
    sim.add_argument("--plot", metavar="FILE.png", default=None, help="plot the TTFT distribution and per-tier hits")
    sim.add_argument("--prefetch-window", type=int, default=16, help="queued requests the prefetcher looks ahead (default 16)")
    sim.add_argument("--prefetch-budget", default=None, help="bytes of promotions in flight at most (e.g. 1GiB)")
    sim.add_argument("--write-mode", choices=("write-through", "write-back"), default="write-through",
                     help="copy new blocks down at once, or only when evicted (default write-through)")
    sim.add_argument("--max-batch", type=int, default=16, help="requests an engine instance runs at once (default 16)")
    sim.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                     help="also run the no-cache, GPU-only and no-prefetch baselines (default on)")
    sim.add_argument("--max-requests", type=int, default=None, help="replay only the first N requests")
    sim.add_argument("--transfer-profile", default=None, help="--real: profile of this machine's links "
                     "(default cpu-this-machine)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Dispatches: hit-only here, the simulation (and --real) to `replay.simulate`."""
    if args.hit_only:
        return run_hit_only(args)
    from kvtier.scheduler.cli.simulate import run_simulation

    return run_simulation(args)


def load_requests(args: argparse.Namespace) -> tuple[Any, str]:
    """The trace's requests (a file, or a built-in workload) and the name to report."""
    from kvtier.scheduler.replay import traces, workloads

    if args.trace is None:
        args.trace = DEMO_WORKLOAD
    path = Path(args.trace)
    if args.trace == "mooncake" and not path.exists():
        path = traces.MOONCAKE_TRACE
    if not path.exists() and args.trace in workloads.KINDS:
        reqs = workloads.generate(args.trace, args.requests or DEMO_REQUESTS, args.seed,
                                  block_tokens=args.block_tokens or workloads.DEFAULT_BLOCK_TOKENS)
        return traces.Trace(f"builtin:{args.trace}", traces.TraceFormat.KVTIER, reqs), f"builtin:{args.trace}"
    return traces.read_trace(path, args.format, skip_bad=args.skip_bad), path.name


def _progress(enabled: bool):
    """The progress bar of long runs (None when off)."""
    from kvtier.scheduler.replay.simreport import progress_bar

    return progress_bar() if enabled else None


def run_hit_only(args: argparse.Namespace) -> int:
    """`kvtier replay --hit-only`: the sweep, its table and its JSON."""
    from kvtier.scheduler.policies import parse_policy_names
    from kvtier.scheduler.replay import hitonly, report

    capacities = _ints(args.cache_blocks, "--cache-blocks")
    policies = parse_policy_names(args.policy)
    bounds = [] if args.bounds.strip().lower() == "none" else [b for b in args.bounds.split(",") if b.strip()]
    if not 0.0 <= args.warmup_fraction < 1.0:
        raise ConfigError(f"--warmup-fraction: {args.warmup_fraction}; expected 0 <= F < 1")
    trace, name = load_requests(args)
    work = hitonly.HitOnlyWorkload.from_requests(trace.requests, args.weight, args.warmup_fraction, args.hints)
    progress = _progress(not args.quiet and sys.stderr.isatty())
    jobs = args.jobs if args.jobs is not None else min(4, os.cpu_count() or 1)
    if jobs < 1:
        raise ConfigError(f"--jobs: {jobs}; expected an int >= 1")
    result = hitonly.sweep(work, capacities, policies, bounds, progress, jobs=jobs)
    meta = {"trace": name, "format": trace.format.value, "requests": len(trace.requests),
            "blocks": sum(len(k) for k in work.keys), "skipped": trace.skipped, "weight": args.weight,
            "warmup_fraction": args.warmup_fraction, "measured_requests": work.num_requests - work.start,
            "hints": args.hints}
    if trace.skipped and not args.quiet:
        print(f"kvtier replay: skipped {trace.skipped} malformed record(s); first: {trace.errors[0]}",
              file=sys.stderr)
    if not args.quiet:
        print(report.hit_only_table(result, meta))
    if args.json:
        doc = report.hit_only_json(result, meta)
        try:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as err:
            raise ConfigError(f"--json: cannot write {args.json} ({err.strerror})") from err
    return 0
