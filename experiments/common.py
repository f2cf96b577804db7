"""Shared helpers of the figure scripts: output paths, CSV/JSON writing, matplotlib set-up."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

OUT = Path(__file__).resolve().parent / "out"


def out_path(name: str) -> Path:
    """A file under experiments/out/ (created on first use)."""
    OUT.mkdir(parents=True, exist_ok=True)
    return OUT / name


def write_csv(name: str, rows: Iterable[Mapping[str, Any]]) -> Path:
    rows = list(rows)
    path = out_path(name)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(name: str, data: Any) -> Path:
    path = out_path(name)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt
