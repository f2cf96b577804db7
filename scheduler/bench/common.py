"""Shared pieces of the benchmarks: interleaved repeats, ratios with spread, load, tables, JSON.

docs/design.md "How performance is judged": every figure is a ratio against a limit measured in the same
run; the measured path and its limit are interleaved (A, B, A, B, ...), each repeated several
times, and the median ratio is reported with its spread.

Every benchmark's JSON also carries (added by `write_json`):
- `spread`: per headline figure, the median and the min-max of its repeats (`spread_of`), filled by
  the benchmark through `note_spread`;
- `load_avg`: the machine's 1/5/15-minute load averages when the run began (`begin_run`, called by
  the CLI before a benchmark starts) and when it ended, and the CPU count: a figure read without the
  load it was measured under says little on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


@dataclass(frozen=True, slots=True)
class Ratio:
    """Median of per-repeat ratios limit_time / path_time (>= 1 means faster than the limit), with spread."""

    median: float
    low: float
    high: float
    path_s: float
    limit_s: float

    def as_dict(self) -> dict[str, float]:
        return {"ratio": round(self.median, 4), "ratio_min": round(self.low, 4), "ratio_max": round(self.high, 4),
                "path_ms": round(self.path_s * 1e3, 3), "limit_ms": round(self.limit_s * 1e3, 3)}


def interleave(fns: Mapping[str, Callable[[], Any]], repeats: int, setup: Callable[[str], Any] | None = None,
               warmup: int = 1, settle_s: float = 0.0) -> dict[str, list[float]]:
    """Times each function `repeats` times in turn (A, B, C, A, B, C, ...) and returns seconds per name.

    `setup(name)` runs before each timed call and is not timed (e.g. dropping the page cache); then
    `settle_s` seconds pass, untimed, so that threads the previous call woke go idle first (OpenMP's
    threads spin for about 10 ms after each parallel region here, e.g. after a `copy_`: a path timed
    right after one shared the two cores with them and read 0.78-0.85x of that `copy_` where it read
    0.90-0.99x after a 20 ms pause).
    """
    for _ in range(warmup):
        for name, fn in fns.items():
            if setup:
                setup(name)
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if setup:
                setup(name)
            if settle_s:
                time.sleep(settle_s)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(limit_s: Sequence[float], path_s: Sequence[float]) -> Ratio:
    """Per-repeat limit/path ratios (paired by repeat), summarised by their median and range."""
    ratios = [lim / p for lim, p in zip(limit_s, path_s) if p > 0]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), statistics.median(path_s),
                 statistics.median(limit_s))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread_of(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """{"median", "min", "max", "n"} of a figure's repeats (rounded to `digits` decimals)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("spread_of: no values")
    return {"median": round(statistics.median(vals), digits), "min": round(min(vals), digits),
            "max": round(max(vals), digits), "n": len(vals)}


def note_spread(results: dict[str, Any], key: str, values: Sequence[float], digits: int = 4) -> None:
    """Records the repeats of headline figure `key` in `results["spread"][key]` (see `spread_of`)."""
    results.setdefault("spread", {})[key] = spread_of(values, digits)


_RUN_LOAD: list[tuple[float, float, float]] = []


def load_avg() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15-minute load averages (zeros where the OS has none)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (0.0, 0.0, 0.0)


def begin_run() -> None:
    """Marks the start of a benchmark run: `write_json` reports the load average then and at its end."""
    _RUN_LOAD[:] = [load_avg()]


def load_report() -> dict[str, Any]:
    """The load averages at the run's start (when `begin_run` was called) and now, with the CPU count."""
    report: dict[str, Any] = {"end": list(load_avg()), "cpus": os.cpu_count()}
    if _RUN_LOAD:
        report["start"] = list(_RUN_LOAD[0])
    return report


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                            "python": platform.python_version()}
    try:
        import os

        info["cpus"] = os.cpu_count()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
    return info


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """Prints rows as an aligned text table (stdout is the CLI's)."""
    if title:
        print(title)
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_json(path: str | Path | None, data: Mapping[str, Any]) -> None:
    """Writes `data` as indented JSON when a path is given, with the run's `load_avg` (`load_report`)."""
    if path:
        data = {**data, "load_avg": data.get("load_avg") or load_report()}
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
