"""The `kvtier` command line.

Each sub-command lives in its own module of this package with two functions, `add_parser(subparsers)`
and `run(args) -> int`. Modules import heavy libraries (torch, transformers, vllm) inside `run`, never
at the top: the hit-only and simulation paths must start without importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kvtier.tiers.errors import KVTierError

#: sub-command modules, in the order `kvtier --help` lists them
SUBCOMMANDS = ("replay", "gen_trace", "calibrate", "profiles", "bench", "torture", "models")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache offload for LLM serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue  # a sub-command not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvtier` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KVTierError as err:
        print(f"kvtier {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
