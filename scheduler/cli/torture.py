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
    p.add_argument("--corruptions", type=int, default=100,
                   help="values damaged in place after the kills (flipped bits, truncation, swapped values, "
                        "zeroed pages); each must read back as a miss (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.scheduler.bench.common import write_json
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
        if args.corruptions:
            import logging

            from kvtier.scheduler.torture import corrupt_store

            # every damaged value is reported by the figures below, not one warning each
            logging.getLogger("kvtier.tiers.disk.store").setLevel(logging.ERROR)
            corrupt_store(store, args.corruptions, result, seed=args.seed)
    finally:
        if show:
            print(file=sys.stderr)
        if not args.dir:
            shutil.rmtree(store, ignore_errors=True)
    data = result_json(result)
    print(f"kills {result.kills}, acknowledged blocks {result.acknowledged_blocks}, lost {result.acknowledged_blocks_lost}, "
          f"wrong served {result.wrong_blocks_served}, reopen failures {result.reopen_failures}, "
          f"blocks checked {result.blocks_checked}; corruptions injected {result.corruptions_injected}, "
          f"detected {result.corruptions_detected}; {result.seconds} s")
    for line in data["failures"]:
        print(f"  {line}")
    write_json(args.json, data)
    ok = not (result.acknowledged_blocks_lost or result.wrong_blocks_served or result.reopen_failures
              or result.cycles_without_ack or result.corruptions_detected < result.corruptions_injected)
    return 0 if ok else 1
