"""The `kvtier replay` flags of the simulation and --real modes, without importing the simulator.

`add_simulation_arguments(parser)` adds each flag only when the parser lacks it, so `cli/replay.py` may
define any of them itself; it imports nothing but argparse (building the CLI parser stays fast).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_simulation_arguments(parser: Any) -> None:
    """Adds this mode's flags that `parser` (the `kvtier replay` parser) does not define yet."""
    known = set(getattr(parser, "_option_string_actions", {}))

    def add(*flags: str, **kwargs: Any) -> None:
        if not known.intersection(flags):
            parser.add_argument(*flags, **kwargs)

    add("--max-batch", "--concurrency", type=int, default=16, dest="max_batch",
        help="requests running at once on the simulated engine (default 16)")
    add("--gpu-blocks", type=int, default=None, help="gpu tier capacity in blocks (overrides --gpu)")
    add("--host-blocks", type=int, default=None, help="host tier capacity in blocks (overrides --host)")
    add("--disk-blocks", type=int, default=None, help="disk tier capacity in blocks (overrides --disk)")
    add("--write-mode", choices=("write-through", "write-back"), default="write-through",
        help="how saved blocks reach the disk (default write-through)")
    add("--prefetch-window", type=int, default=8, help="queued requests the prefetcher looks over (default 8)")
    add("--prefetch-budget", default=None, help="promotion bytes in flight at most (default 1GiB)")
    add("--baselines", action=argparse.BooleanOptionalAction, default=True,
        help="also run the baselines and bounds (default on)")
    add("--max-requests", type=int, default=None,
        help="replay only the first N requests (default: all; --real: 500)")
    add("--transfer-profile", default=None,
        help="--real: profile that predicts this machine's transfers (default cpu-this-machine)")
