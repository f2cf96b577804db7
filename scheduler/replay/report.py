"""Hit-only reports: the summary table and the JSON document of `kvtier replay --hit-only`.

JSON (`hit_only_json`): `results`, one object per (capacity, policy) with `policy`,
`cache_blocks`, `block_hit_ratio`, `hits`, `total`, `seconds` and `bounds` {`infinite`, `opt`, and the
references `belady` and `min` when computed}; when the run is one capacity and one policy, `policy`, `cache_blocks`,
`block_hit_ratio` and `bounds` are also at the top level. Plus what was replayed (`trace`, `format`,
`requests`, `blocks`, `skipped`, `weight`, `warmup_fraction`) and `seconds`.

Table (`hit_only_table`): a row per policy, bound (`opt (bound)`, `infinite (bound)`) and reference
(`belady (reference)`, `classic MIN (reference)`), a column per capacity, ratios to 4 places.
"""

from __future__ import annotations

from typing import Any

from kvtier.scheduler.replay.hitonly import SweepResult

RATIO_DIGITS = 6


def _bounds(sweep: SweepResult, capacity: int) -> dict[str, float]:
    out = {"infinite": round(sweep.infinite, RATIO_DIGITS)}
    if capacity in sweep.opt:
        out["opt"] = round(sweep.opt[capacity], RATIO_DIGITS)
    if capacity in sweep.belady:
        out["belady"] = round(sweep.belady[capacity], RATIO_DIGITS)
    if capacity in sweep.min:
        out["min"] = round(sweep.min[capacity], RATIO_DIGITS)
    return out


def hit_only_json(sweep: SweepResult, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of a hit-only run (module docstring); `meta` describes the trace and options."""
    results = [{"policy": r.policy, "cache_blocks": r.cache_blocks,
                "block_hit_ratio": round(r.block_hit_ratio, RATIO_DIGITS), "hits": r.hits, "total": r.total,
                "seconds": round(r.seconds, 4), "bounds": _bounds(sweep, r.cache_blocks)}
               for r in sweep.results]
    doc: dict[str, Any] = {"mode": "hit-only", **meta, "seconds": round(sweep.seconds, 4)}
    if len(results) == 1:
        only = results[0]
        doc.update({k: only[k] for k in ("policy", "cache_blocks", "block_hit_ratio", "bounds")})
    doc["infinite"] = round(sweep.infinite, RATIO_DIGITS)
    doc["results"] = results
    return doc


def hit_only_table(sweep: SweepResult, meta: dict[str, Any]) -> str:
    """The summary table of a hit-only run (module docstring)."""
    capacities = sorted({r.cache_blocks for r in sweep.results})
    policies: list[str] = []
    for r in sweep.results:
        if r.policy not in policies:
            policies.append(r.policy)
    ratio = {(r.policy, r.cache_blocks): r.block_hit_ratio for r in sweep.results}
    rows = [[p] + [f"{ratio[(p, c)]:.4f}" for c in capacities] for p in policies]
    if sweep.belady and "belady" not in policies:
        rows.append(["belady (reference)"] + [f"{sweep.belady[c]:.4f}" if c in sweep.belady else "-" for c in capacities])
    if sweep.min and "min" not in policies:
        rows.append(["classic MIN (reference)"] + [f"{sweep.min[c]:.4f}" if c in sweep.min else "-" for c in capacities])
    if sweep.opt and "opt" not in policies:
        rows.append(["opt (bound)"] + [f"{sweep.opt[c]:.4f}" if c in sweep.opt else "-" for c in capacities])
    rows.append(["infinite (bound)"] + [f"{sweep.infinite:.4f}"] * len(capacities))
    header = ["policy \\ blocks"] + [f"{c:,}" for c in capacities]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells))

    title = (f"hit-only replay of {meta.get('trace')} ({meta.get('requests'):,} requests, {meta.get('blocks'):,} "
             f"blocks; weight {meta.get('weight')}, warm-up {meta.get('warmup_fraction')}): block hit ratio")
    out = [title, line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if meta.get("skipped"):
        out.append(f"({meta['skipped']} malformed records skipped)")
    out.append(f"({sweep.seconds:.2f} s)")
    return "\n".join(out)
