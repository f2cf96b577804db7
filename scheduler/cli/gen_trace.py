"""`kvtier gen-trace KIND --requests N --seed S`: print a built-in workload as kvtier JSONL.

KIND is one of `chat`, `agents`, `docqa` (`kvtier.scheduler.replay.workloads`). The output is
deterministic for a seed and reads back with `kvtier replay` (format `kvtier`).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gen-trace", help="print a built-in workload (chat, agents, docqa) as a kvtier JSONL trace",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", metavar="KIND", choices=("chat", "agents", "docqa"), help="chat, agents or docqa")
    p.add_argument("--requests", type=int, default=1000, help="number of requests (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--block-tokens", type=int, default=None, help="tokens per block id (default 64)")
    p.add_argument("--output", "-o", default="-", help="output file (default: stdout)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.scheduler.replay import traces, workloads

    reqs = workloads.generate(args.kind, args.requests, args.seed,
                              block_tokens=args.block_tokens or workloads.DEFAULT_BLOCK_TOKENS)
    lines = "".join(json.dumps(rec, separators=(",", ":")) + "\n" for rec in traces.iter_lines(reqs))
    if args.output == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        with open(args.output, "w") as f:
            f.write(lines)
    return 0
