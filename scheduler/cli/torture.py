"""`kvtier torture`: SIGKILL a real disk writer again and again; check nothing acknowledged is lost."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("torture", help="crash-consistency torture of the disk tier (SIGKILL during saves)")
    p.add_argument("--kills", type=int, default=50, help="kill cycles (default 50)")
    p.add_argument("--dir", default=None, help="store directory (default: a temp dir, removed after)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.scheduler.benchutil import write_json
    from kvtier.scheduler.torture import result_json, run_torture
    from kvtier.tiers.errors import ConfigError

    if args.kills < 1:
        raise ConfigError(f"--kills: expected >= 1, got {args.kills}")
    store = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvtier-torture-"))
    show = not args.quiet and sys.stderr.isatty()

    def progress(done: int, r) -> None:
        if show:
            print(f"\rkill {done}/{args.kills}: {r.acknowledged_blocks or '...'} acknowledged so far, "
                  f"{r.acknowledged_blocks_lost} lost, {r.wrong_blocks_served} wrong", end="", file=sys.stderr)

    try:
        result = run_torture(args.kills, store, seed=args.seed, progress=progress)
    finally:
        if show:
            print(file=sys.stderr)
        if not args.dir:
            shutil.rmtree(store, ignore_errors=True)
    data = result_json(result)
    print(f"kills {result.kills}, acknowledged blocks {result.acknowledged_blocks}, lost {result.acknowledged_blocks_lost}, "
          f"wrong served {result.wrong_blocks_served}, reopen failures {result.reopen_failures}, "
          f"corrupt detected {result.corrupt_detected}, blocks checked {result.blocks_checked}, {result.seconds} s")
    for line in data["failures"]:
        print(f"  {line}")
    write_json(args.json, data)
    ok = not (result.acknowledged_blocks_lost or result.wrong_blocks_served or result.reopen_failures
              or result.cycles_without_ack)
    return 0 if ok else 1
