"""`kvtier calibrate`: fit this machine's cost model from real restores and a real prefill, or check a saved one.

    kvtier calibrate --model smollm2-135m --out profile.json [--json FILE] [--quick] [--disk-dir D] [--repeats N]
    kvtier calibrate --check --profile profile.json [--json FILE] [--disk-dir D]
    kvtier calibrate ... --remote redis+cluster://host:port   (or $KVTIER_REMOTE_URL)

The first form measures host restores, cold disk restores and prefills (see `kvtier.scheduler.cost.calibrate`),
fits on half of the points, reports the errors on the other half and saves the fitted model (a profile JSON
that `CostModel.load` and `OffloadConfig.hardware` read). `--check` measures a smaller sweep again and reports
the saved model's errors (no target: the machine's load changes between runs). With a remote configured
(`--remote URL` or `$KVTIER_REMOTE_URL`) the first form also measures the network profile of the remote
tier (round trip, restore bandwidth; `kvtier.scheduler.cost.network`) and saves it in the profile, so
the planner weighs a remote restore against recompute with this network's numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ERROR_KEYS = ("restore_host_error", "restore_disk_error", "recompute_error", "median_abs_rel_error")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure this machine and fit the cost model (or --check a saved one)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model preset name or a HF config.json path (the prefill and the KV geometry)")
    p.add_argument("--out", help="write the fitted profile JSON here")
    p.add_argument("--json", metavar="FILE", help="write the errors, coefficients and raw points to FILE")
    p.add_argument("--quick", action="store_true", help="a small sweep (well under a minute; for tests)")
    p.add_argument("--disk-dir", default=None,
                   help="directory for the cold disk store (default: a temp dir in the system temp dir)")
    p.add_argument("--no-disk", action="store_true", help="skip disk restores (the disk path stays derived)")
    p.add_argument("--repeats", type=int, default=None, help="measured rounds, each point once per round (>= 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the prefill (default 1)")
    p.add_argument("--block-tokens", type=int, default=64, help="tokens per block of the restores (default 64)")
    p.add_argument("--check", action="store_true", help="re-measure and report the errors of --profile")
    p.add_argument("--profile", help="with --check: the profile JSON written by `kvtier calibrate --out`")
    p.add_argument("--remote", default=os.environ.get("KVTIER_REMOTE_URL"), metavar="URL",
                   help="also measure this remote tier's network profile (default: $KVTIER_REMOTE_URL)")
    p.set_defaults(run=run)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_out(path: str) -> Path:
    from kvtier.tiers.errors import ConfigError

    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ConfigError(f"--out: {path!r} is a directory; expected a file path for the profile JSON")
    if not parent.is_dir():
        raise ConfigError(f"--out: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out: {path!r} is not writable")
    return out


def run(args: argparse.Namespace) -> int:
    from kvtier.tiers.errors import ConfigError

    from kvtier.scheduler.bench import common as bu
    from kvtier.scheduler.cost import calibrate as cal

    bu.begin_run()
    if args.check:
        if not args.profile:
            raise ConfigError("--check needs --profile PROFILE.json (written by `kvtier calibrate --out`)")
        sweep = cal.QUICK_SWEEP if args.quick else cal.CHECK_SWEEP
    else:
        if not args.model:
            raise ConfigError("--model is required: a preset name or a HF config.json path")
        if not args.out:
            raise ConfigError("--out is required: where to write the fitted profile JSON")
        sweep = cal.QUICK_SWEEP if args.quick else cal.DEFAULT_SWEEP
    if args.json:
        _check_out(args.json)
    changes = {}
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    if args.threads is not None:
        changes["threads"] = args.threads
    sweep = replace(sweep, **changes)
    # by default the system temp dir: outside the checkout (nothing else walks it) and, here, the same
    # file system as the checkout
    disk_root = None if args.no_disk else (args.disk_dir or tempfile.gettempdir())
    if disk_root is not None and args.disk_dir is None:
        disk_root = tempfile.mkdtemp(prefix=".kvtier-calibrate-", dir=disk_root)
    try:
        if args.check:
            from kvtier.scheduler.cost.model import CostModel

            model = CostModel.load(args.profile)
            report = cal.check(model, sweep, disk_dir=disk_root, progress=_say)
            title = f"kvtier calibrate --check {args.profile}: errors of the saved model on {len(report['points'])} points"
        else:
            out = _check_out(args.out)
            name, config = cal.resolve_model(args.model)
            if args.block_tokens < 1:
                raise ConfigError(f"--block-tokens: expected a positive int, got {args.block_tokens}")
            _say(f"calibrate: {name}, {len(sweep.restore_blocks)} restore sizes x 2 tiers, "
                 f"{len(sweep.recompute_points)} prefill points, {sweep.warmup} + {sweep.repeats} rounds")
            result = cal.calibrate(name if name in _presets() else config, sweep, disk_dir=disk_root,
                                   block_tokens=args.block_tokens, progress=_say)
            if args.remote:
                from kvtier.scheduler.cost import network as calibrate_remote

                network = calibrate_remote.measure_network(result.model.spec, args.remote, repeats=sweep.repeats,
                                                           progress=_say)
                result = replace(result, model=calibrate_remote.with_network(result.model, network),
                                 report={**result.report, **network.to_dict()})
                result.report["coefficients"]["remote"] = result.model.paths["remote"].to_dict()
            try:
                result.model.save(out)
            except OSError as err:
                raise ConfigError(f"--out: cannot write {args.out!r}: {err}") from None
            report = {**result.report, "profile_path": str(out)}
            title = (f"kvtier calibrate {name}: held-out errors (fitted on {report['num_points'] - report['num_held_out']}"
                     f" points, predicting {report['num_held_out']})")
    finally:
        if disk_root is not None and args.disk_dir is None:
            import shutil

            shutil.rmtree(disk_root, ignore_errors=True)
    report["machine"] = bu.machine()
    rows = [{"kind": key, "median_abs_rel_error": report[key]} for key in ERROR_KEYS]
    bu.print_table(rows, ["kind", "median_abs_rel_error"], title)
    print()
    for part, coeffs in report["coefficients"].items():
        print(f"{part}: " + ", ".join(f"{k}={v:.4g}" for k, v in coeffs.items()))
    load = bu.load_report()
    print(f"wall {report['wall_s']} s; machine: {report['machine']}; load average (1/5/15 min): "
          f"start {load.get('start')}, end {load['end']}")
    if not args.check:
        print(f"profile written to {report['profile_path']}")
    bu.write_json(args.json, report)
    return 0


def _presets() -> set[str]:
    from kvtier.tiers.spec import PRESETS

    return set(PRESETS)
