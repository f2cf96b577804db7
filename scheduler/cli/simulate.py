"""`kvtier replay` without --hit-only: the simulation, or `--real` through the real tiers.

The argument handling of these modes (capacities given as bytes or blocks, `--time-scale`, the trace
or built-in workload to load) lives here; `kvtier.scheduler.replay` takes plain settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import parse_size

#: `kvtier replay` with no trace (the README's `make demo`): this built-in workload
DEMO_WORKLOAD = "chat"
DEMO_REQUESTS = 2000
DEFAULT_REAL_REQUESTS = 500


def capacity_blocks(args: argparse.Namespace, tier: str, bytes_per_block: int) -> int | None:
    """A tier's capacity in blocks from `--TIER-blocks` or `--TIER` (bytes like 2GiB, or blocks like 2000b)."""
    blocks = getattr(args, f"{tier}_blocks", None)
    if blocks is not None:
        return blocks
    text = getattr(args, tier, None)
    if text is None:
        return None
    text = str(text).strip()
    if text.lower().endswith("b") and text[:-1].strip().isdigit():  # "2000b": blocks
        return int(text[:-1])
    size = parse_size(text, f"--{tier}")
    if 0 < size < bytes_per_block:
        raise ConfigError(f"--{tier}: {text} is smaller than one block ({bytes_per_block} bytes); expected 0 "
                          f"(no {tier} tier) or at least one block")
    return size // bytes_per_block


def settings_from_args(args: argparse.Namespace, bytes_per_block: int | None = None) -> Any:
    """`SimSettings` from the parsed `kvtier replay` arguments (flags missing from `args` keep defaults);
    capacities are converted to blocks when `bytes_per_block` is given."""
    from kvtier.scheduler.replay.simulate import SimSettings

    scale_text = str(getattr(args, "time_scale", "auto") or "auto").strip().lower()
    try:
        time_scale = None if scale_text == "auto" else float(scale_text)
    except ValueError:
        raise ConfigError(f"--time-scale: {scale_text!r}; expected a number > 0 or 'auto'") from None
    budget = getattr(args, "prefetch_budget", None)
    policy = str(getattr(args, "policy", "lru") or "lru")
    if "," in policy:
        raise ConfigError(f"--policy: {policy!r}; simulation runs one policy (a list is for --hit-only)")
    settings = SimSettings(
        model=getattr(args, "model", "llama-3-8b") or "llama-3-8b",
        hardware=getattr(args, "hardware", "h100-sxm") or "h100-sxm",
        policy=policy, prefetch=bool(getattr(args, "prefetch", True)),
        prefetch_window=int(getattr(args, "prefetch_window", 16)),
        prefetch_budget_bytes=None if budget is None else parse_size(budget, "--prefetch-budget"),
        write_mode=getattr(args, "write_mode", "write-through") or "write-through",
        max_batch=int(getattr(args, "max_batch", 16) or 16), time_scale=time_scale,
        block_tokens=getattr(args, "block_tokens", None))
    if bytes_per_block is not None:
        settings = replace(settings, **{f"{t}_blocks": capacity_blocks(args, t, bytes_per_block)
                                        for t in ("gpu", "host", "disk")},
                           remote_blocks=capacity_blocks(args, "remote", bytes_per_block) or 0)
    return settings


def load_trace(args: argparse.Namespace) -> tuple[Any, str]:
    """The trace (a file or a built-in workload; the demo workload without one), cut to --max-requests."""
    from kvtier.scheduler.cli.replay import load_requests

    if getattr(args, "trace", None) in (None, ""):
        args.trace = DEMO_WORKLOAD
        if getattr(args, "requests", None) is None:
            args.requests = DEMO_REQUESTS
    trace, name = load_requests(args)
    limit = getattr(args, "max_requests", None)
    if getattr(args, "real", False) and limit is None:
        limit = DEFAULT_REAL_REQUESTS
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--max-requests: {limit}; expected an int >= 1")
        trace.requests = trace.requests[:limit]
    return trace, name


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    """Writes `doc` to `--json FILE` (a clear error when FILE cannot be written)."""
    if not path:
        return
    try:
        Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    except OSError as err:
        raise ConfigError(f"--json: cannot write {path} ({err.strerror})") from err


def run_simulation(args: argparse.Namespace) -> int:
    """`kvtier replay [TRACE]` without --hit-only: simulation (or --real); prints the summary, writes
    --json and --plot. Returns the exit status."""
    from kvtier.scheduler.replay import simreport
    from kvtier.scheduler.replay.simulate import prepare, run_all

    trace, name = load_trace(args)
    quiet = bool(getattr(args, "quiet", False))
    progress = simreport.progress_bar() if not quiet and sys.stderr.isatty() else None
    if getattr(args, "real", False):
        return run_real(args, trace, name, progress)
    settings = settings_from_args(args)
    workload = prepare(trace.requests, settings)
    settings = settings_from_args(args, workload.cost_model.spec.bytes_per_block)
    plot = getattr(args, "plot", None)
    if plot:
        simreport.check_plotting()
    jobs = getattr(args, "jobs", None)
    jobs = min(2, os.cpu_count() or 1) if jobs is None else jobs
    start = time.perf_counter()
    main, baselines, found = run_all(workload, settings, with_baselines=bool(getattr(args, "baselines", True)),
                                     jobs=jobs, progress=progress)
    meta = {"trace": name, "format": trace.format.value, "skipped": trace.skipped}
    doc = simreport.simulation_json(main, workload, baselines, found, meta, time.perf_counter() - start)
    if trace.skipped and not quiet:
        print(f"kvtier replay: skipped {trace.skipped} malformed record(s); first: {trace.errors[0]}",
              file=sys.stderr)
    if not quiet:
        print(simreport.simulation_table(doc))
    write_json(getattr(args, "json", None), doc)
    if plot:
        simreport.plot(main, doc, plot)
    return 0


def run_real(args: argparse.Namespace, trace: Any, name: str, progress: Any) -> int:
    """`kvtier replay --real`: exit status 0, or 1 when a restored block's bytes were wrong."""
    from kvtier.scheduler.replay import realmode
    from kvtier.scheduler.replay.simulate import prepare

    settings = settings_from_args(args)
    workload = prepare(trace.requests, settings)
    spec = realmode.scaled_spec(settings.model, workload.block_tokens)
    settings = settings_from_args(args, spec.bytes_per_block)
    doc = realmode.run_real(workload, settings, spec, trace_name=name, trace_format=trace.format.value,
                            transfer_profile=getattr(args, "transfer_profile", None) or "cpu-this-machine",
                            disk_path=getattr(args, "disk_path", None), progress=progress,
                            remote_url=getattr(args, "remote_url", None))
    if not getattr(args, "quiet", False):
        print(realmode.real_table(doc))
    write_json(getattr(args, "json", None), doc)
    return 0 if doc["corrupt_blocks"] == 0 else 1
