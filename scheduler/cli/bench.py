"""`kvtier bench tiers|scheduler|engine|replay|vllm|prefetch|policy|remote|all`: the benchmarks behind
docs/measurements.md (remote: docs/remote.md).

Each benchmark lives in `kvtier.scheduler.bench.<name>` (imported only when run) with
`add_arguments(parser)` and `run(args) -> int`; `all` (`bench.suite`) runs the acceptance ones in
separate processes with the other core busy and writes one summary (`make bench`).
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = ("tiers", "scheduler", "engine", "replay", "vllm", "prefetch", "policy", "remote", "all")
#: benchmark -> module under kvtier.scheduler.bench, where it is not <name>
MODULES = {"all": "suite"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark (ratios against limits measured in the same run)")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES:
        p = benches.add_parser(name, help=f"benchmark: {name}")
        p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
        p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a smoke run)")
        try:
            module = importlib.import_module(f"kvtier.scheduler.bench.{MODULES.get(name, name)}")
            module.add_arguments(p)
        except Exception as err:  # one broken benchmark must not break every other command
            p.set_defaults(run=_unavailable(name, err))
            continue
        p.set_defaults(run=_with_load(module.run))


def _with_load(run):
    """`run`, with the load average recorded at its start and printed at its end (common.begin_run)."""
    def wrapped(args: argparse.Namespace) -> int:
        from kvtier.scheduler.bench import common as bu

        bu.begin_run()
        code = run(args)
        load = bu.load_report()
        print(f"load average (1/5/15 min): start {load.get('start')}, end {load['end']}, {load['cpus']} CPUs")
        return code
    return wrapped


def _unavailable(name: str, err: Exception):
    def run(args: argparse.Namespace) -> int:
        raise SystemExit(f"kvtier bench {name}: unavailable ({type(err).__name__}: {err})")
    return run
