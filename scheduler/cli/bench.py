"""`kvtier bench tiers|scheduler|engine|replay|vllm`: the benchmarks behind docs/measurements.md.

Each benchmark lives in `kvtier.scheduler.bench.<name>` (imported only when run) with
`add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = ("tiers", "scheduler", "engine", "replay", "vllm")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (ratios against limits measured in the same run)")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES:
        p = benches.add_parser(name, help=f"benchmark: {name}")
        p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
        p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a smoke run)")
        try:
            module = importlib.import_module(f"kvtier.scheduler.bench.{name}")
            module.add_arguments(p)
        except Exception as err:  # one broken benchmark must not break every other command
            p.set_defaults(run=_unavailable(name, err))
            continue
        p.set_defaults(run=module.run)


def _unavailable(name: str, err: Exception):
    def run(args: argparse.Namespace) -> int:
        raise SystemExit(f"kvtier bench {name}: unavailable ({type(err).__name__}: {err})")
    return run
