"""`kvtier profiles`: the named hardware profiles with their numbers, and what they predict for a model.

    kvtier profiles                          # table of every profile
    kvtier profiles --model llama-3-70b --tp 8 --tokens 8192
    kvtier profiles --profile my.json --json out.json

The table shows each profile's numbers and, for `--model` (default llama-3-8b) and a `--tokens` prefix
(default 8192), the predicted recompute time and restore times from host, disk and disk with zstd.
`--json FILE` writes `{"model", "tokens", "block_tokens", "tp", "copy_granularity", "profiles": [...]}`,
each profile's JSON fields plus a `predicted_ms` object. Profiles are JSON files the user may edit: the
packaged ones, those in `$KVTIER_PROFILE_DIR`, and any given with `--profile PATH`.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("profiles", help="list the hardware profiles and what they predict",
                            description="List the hardware profiles (editable JSON files) with their numbers and "
                                        "the cost model's predictions for one model and prefix length.")
    parser.add_argument("--profile", action="append", metavar="NAME_OR_PATH",
                        help="show only these profiles (a name or a JSON path; repeatable)")
    parser.add_argument("--model", default="llama-3-8b", help="model preset for the predictions (default llama-3-8b)")
    parser.add_argument("--tokens", type=int, default=8192, help="prefix length of the predictions (default 8192)")
    parser.add_argument("--block-tokens", type=int, default=64, help="tokens per block (default 64)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    parser.add_argument("--copy-granularity", default="block", choices=["block", "layer", "layer-kv"],
                        help="copies per block on the host link (default block: one copy per block)")
    parser.add_argument("--json", metavar="FILE", help="write the profiles and predictions to FILE as JSON")
    parser.set_defaults(run=run)


_COLUMNS = (  # header, unit scale, format, source
    ("profile", None, "{}", "name"),
    ("TFLOP/s", 1e-12, "{:.4g}", "peak_flops"),
    ("MFU", 1, "{:.2f}", "mfu"),
    ("HBM TB/s", 1e-12, "{:.3g}", "hbm_bytes_per_s"),
    ("link GB/s", 1e-9, "{:.0f}", "host_link_bytes_per_s"),
    ("copy us", 1e6, "{:.1f}", "copy_overhead_s"),
    ("disk GB/s", 1e-9, "{:.1f}", "disk_bytes_per_s"),
    ("zstd GB/s", 1e-9, "{:.1f}", "zstd_decode_bytes_per_s"),
    ("ratio", 1, "{:.2f}", "zstd_ratio"),
)


def run(args: argparse.Namespace) -> int:
    from kvtier.tiers.errors import ConfigError

    from kvtier.scheduler.cost.model import CostModel
    from kvtier.scheduler.cost.hardware import list_profiles, load_profile

    if args.tokens <= 0:
        raise ConfigError(f"--tokens: expected a positive int, got {args.tokens}")
    profiles = [load_profile(p) for p in args.profile] if args.profile else list_profiles()
    n = args.tokens
    rows, records = [], []
    for profile in profiles:
        # a calibrated profile predicts with its fitted coefficients (its recompute only for its own model)
        model = CostModel.from_json(profile.to_dict(), args.model, block_tokens=args.block_tokens, tp=args.tp,
                                    copy_granularity=args.copy_granularity, source=profile.source)
        blocks = -(-n // args.block_tokens)
        predicted = {"recompute": model.recompute_s(0, n) * 1e3,
                     **{path: model.restore_s(path, blocks) * 1e3 for path in ("host", "disk", "disk_zstd")},
                     "decode_step": model.decode_step_s(1, n) * 1e3}
        row = [fmt.format(getattr(profile, src) * scale if scale else getattr(profile, src))
               for _, scale, fmt, src in _COLUMNS]
        row += [f"{predicted[k]:.1f}" for k in ("recompute", "host", "disk", "disk_zstd")]
        row.append(f"{predicted['recompute'] / predicted['host']:.1f}x")
        rows.append(row)
        record = profile.to_dict()
        record["source"] = profile.source
        record["predicted_ms"] = predicted
        record["fitted"] = sorted(model.fitted)
        records.append(record)
    header = [c[0] for c in _COLUMNS] + ["recompute ms", "host ms", "disk ms", "zstd ms", "recomp/host"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = sys.stdout
    out.write(f"hardware profiles; predictions for {args.model}, {n}-token prefix, {args.block_tokens}-token blocks, "
              f"TP={args.tp}, copies per {args.copy_granularity}\n")
    out.write("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths))) + "\n")
    for row in rows:
        out.write("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + "\n")
    for profile, record in zip(profiles, records):
        fitted = f" [measured: {', '.join(record['fitted'])}]" if record["fitted"] else ""
        if profile.description or fitted:
            out.write(f"  {profile.name}: {profile.description}{fitted}\n")
    if args.json:
        payload = {"model": args.model, "tokens": n, "block_tokens": args.block_tokens, "tp": args.tp,
                   "copy_granularity": args.copy_granularity, "profiles": records}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
    return 0
