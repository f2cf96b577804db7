"""`kvtier calibrate`: measure restores and recompute on this machine, fit the cost model, check it.

Primitives:
- `Sweep`: what one run measures: restore sizes in blocks (host and cold disk), recompute (start, n)
  points, rounds (`repeats`, each point once per round) and warm-up rounds. `DEFAULT_SWEEP` (a few
  minutes here), `QUICK_SWEEP` (tests, well under a minute), `CHECK_SWEEP` (`--check`).
- `Measured`: one point (kind, size) with every sample and their median.
- `measure(spec, config, sweep, ...)`: runs the rigs of `cost.rigs` in rounds after warm-up rounds;
  within a round every point of every kind (restore host, restore disk, recompute) runs once (restores
  `restore_samples` / `disk_samples` times), in a fresh random order, so slow drifts of a shared machine hit all points
  alike; one sample of a small point is the mean of a short batch of timed runs (`Sweep`); each point's
  figure is the median of its samples.
- `split(points)`: per kind, points sorted by size and alternated: even positions fit, odd ones are held
  out (the extremes stay in the fit half, so held-out points are interpolated).
- `calibrate(model, sweep, ...)` -> `Calibration`: measures, fits `CostModel.from_profile("cpu-this-machine",
  model)` on the fit half and predicts the held-out half IN THE SAME RUN (a noisy machine cannot compare two
  runs); `check(cost_model, sweep, ...)`: measures again and reports the errors of a saved model.
- `error_summary(model, points)`: `restore_host_error`, `restore_disk_error`, `recompute_error` (median
  |predicted - measured| / measured of each kind) and `median_abs_rel_error` (over all the points).
- `resolve_model(text)`: a preset name or a path to a HF config.json -> (name, config dict).

Invariants: the reported errors are those of the returned (and saved) model on points it was not fitted on;
nothing here prints (progress goes to an optional callback).
"""

from __future__ import annotations

import gc
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import PRESETS, KVSpec

from kvtier.scheduler.cost.fit import RecomputePoint, RestorePoint, fit_model, predict
from kvtier.scheduler.cost.model import CostModel

log = logging.getLogger(__name__)

KINDS = ("restore_host", "restore_disk", "recompute")
_PATH = {"restore_host": "host", "restore_disk": "disk"}

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Sweep:
    """The points of one calibration run.

    Attributes:
        restore_blocks: restore sizes in blocks (each measured from host and from a cold disk).
        recompute_points: (start_tokens, num_tokens) prefill points.
        repeats: measured rounds (each point once per round; the figure is the median), at least 5.
        warmup: unmeasured rounds first.
        threads: torch threads of the prefill. 1 by default: on this shared 2-core machine (load 6-14 from
            other jobs) a 2-thread prefill measured 10-40x slower than 1 thread and erratic (OpenMP threads
            spin at barriers while their partner is descheduled), so its times cannot be fitted.
        restore_samples: samples per host restore point per round (restores cost milliseconds, where the
            wake-up latency of a busy machine is a large share: more samples steady the median cheaply).
        disk_samples: the same for cold disk restores (the one virtio disk is shared with other jobs'
            I/O: a cold read of 32 blocks measured 0.3x to 5x its median here).
        host_batch_blocks, disk_batch_blocks, recompute_batch_tokens: one sample of a small point is the
            mean of back-to-back timed runs (each timed alone, setup untimed between them) that together
            move at least this many blocks (compute this many tokens), as `timeit` loops a short statement:
            a preemption of a few ms on this loaded machine would otherwise swamp a 1 ms restore.
    """

    restore_blocks: tuple[int, ...]
    recompute_points: tuple[tuple[int, int], ...]
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    restore_samples: int = 3
    disk_samples: int = 5
    host_batch_blocks: int = 64
    disk_batch_blocks: int = 32
    recompute_batch_tokens: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.repeats, int) or self.repeats < 5:
            raise ConfigError(f"repeats: expected an int >= 5 (the median of at least 5 runs), got {self.repeats!r}")
        if len(set(self.restore_blocks)) < 3 or min(self.restore_blocks) < 1:
            raise ConfigError(f"restore_blocks: expected >= 3 distinct positive sizes, got {self.restore_blocks!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads: expected a positive int, got {self.threads!r}")
        for name in ("restore_samples", "disk_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        for name in ("host_batch_blocks", "disk_batch_blocks", "recompute_batch_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if len(set(self.recompute_points)) < 6:
            raise ConfigError(f"recompute_points: expected >= 6 distinct points, got {self.recompute_points!r}")

    @property
    def max_tokens(self) -> int:
        """Largest start + n."""
        return max(s + n for s, n in self.recompute_points)


def _grid(starts: Sequence[int], sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((s, n) for s in starts for n in sizes)


DEFAULT_SWEEP = Sweep(restore_blocks=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64),
                      recompute_points=_grid((0, 1024, 2048), (64, 128, 256, 512)), repeats=5)
QUICK_SWEEP = Sweep(restore_blocks=(1, 2, 3, 4, 6, 8, 12), recompute_points=_grid((0, 128), (16, 32, 64)),
                    host_batch_blocks=12, disk_batch_blocks=6, recompute_batch_tokens=16, restore_samples=2,
                    disk_samples=2)
CHECK_SWEEP = Sweep(restore_blocks=(1, 3, 8, 16, 32), recompute_points=_grid((0, 1024), (64, 128, 256)))


@dataclass(slots=True)
class Measured:
    """One sweep point: `kind` with `size` (blocks, or (start, n) for recompute) and its samples."""

    kind: str
    size: Any
    samples: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Median of the samples."""
        return statistics.median(self.samples)

    @property
    def order(self) -> tuple:
        """Sort key: by size (recompute: by start, then n)."""
        return tuple(self.size) if isinstance(self.size, tuple) else (self.size,)

    def point(self) -> RestorePoint | RecomputePoint:
        """The cost-fit point of the median."""
        if self.kind == "recompute":
            return RecomputePoint(int(self.size[0]), int(self.size[1]), self.seconds)
        return RestorePoint(_PATH[self.kind], int(self.size), self.seconds)

    def to_dict(self) -> dict[str, Any]:
        """Raw figures for the JSON report."""
        data: dict[str, Any] = {"kind": self.kind}
        if self.kind == "recompute":
            data.update(start_tokens=self.size[0], num_tokens=self.size[1])
        else:
            data["num_blocks"] = self.size
        data.update(seconds=self.seconds, samples=[round(s, 7) for s in self.samples],
                    spread=(max(self.samples) - min(self.samples)) / self.seconds if self.seconds > 0 else 0.0)
        return data


def resolve_model(text: str) -> tuple[str, dict[str, Any]]:
    """A preset name or a HF config.json path -> (model name, config dict).

    Raises:
        ConfigError: neither a preset nor a readable JSON object.
    """
    if text.lower() in PRESETS:
        return text.lower(), dict(PRESETS[text.lower()])
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"--model: {text!r} is neither a preset ({', '.join(PRESETS)}) nor a HF config.json file")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--model: cannot read {text!r} as a HF config.json: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--model: {text!r} holds JSON {type(config).__name__}, expected an object (config.json)")
    name = str(config.get("_name_or_path") or path.parent.name or path.stem)
    config.setdefault("_name_or_path", name)
    return name, config


def measure(spec: KVSpec, config: Mapping[str, Any], sweep: Sweep, *, disk_dir: str | None,
            progress: Progress | None = None, seed: int = 0) -> list[Measured]:
    """Measures every point of `sweep` (module docstring: interleaved rounds, median per point).

    Args:
        spec: KV geometry of the restores.
        config: the model's HF config (the prefill).
        sweep: the points.
        disk_dir: where the cold-disk store goes; None skips disk restores.
        progress: called with one line per round.

    Returns:
        every point with its samples.
    """
    from kvtier.scheduler.cost.rigs import RecomputeRig, RestoreRig

    points = [Measured("restore_host", n) for n in sorted(set(sweep.restore_blocks))]
    if disk_dir is not None:
        points += [Measured("restore_disk", n) for n in sorted(set(sweep.restore_blocks))]
    points += [Measured("recompute", tuple(p)) for p in sorted(set(sweep.recompute_points))]
    rng = random.Random(seed)
    say = progress or (lambda line: None)
    with RestoreRig(spec, max(sweep.restore_blocks), disk_dir, seed=seed) as restore, \
            RecomputeRig(config, threads=sweep.threads, max_tokens=sweep.max_tokens, seed=seed) as recompute:
        runners = {
            "restore_host": lambda n: restore.host(n, -(-sweep.host_batch_blocks // n)),
            "restore_disk": lambda n: restore.disk(n, -(-sweep.disk_batch_blocks // n)),
            "recompute": lambda size: recompute.run(*size, repeat=-(-sweep.recompute_batch_tokens // size[1]))}
        restore.verify()
        # the heap is large after importing transformers: a full collection costs ~1 s here. Freeze what
        # exists (never collected again) and collect only between timed calls, never inside one
        gc.collect()
        gc.freeze()
        total = sweep.warmup + sweep.repeats
        for round_no in range(total):
            began = time.monotonic()
            samples = {"recompute": 1, "restore_host": sweep.restore_samples, "restore_disk": sweep.disk_samples}
            order = [p for p in points for _ in range(samples[p.kind])]
            rng.shuffle(order)
            for p in order:
                gc.collect(1)
                gc.disable()
                try:
                    seconds = runners[p.kind](p.size)
                finally:
                    gc.enable()
                if round_no >= sweep.warmup:
                    p.samples.append(seconds)
            what = "warm-up" if round_no < sweep.warmup else f"round {round_no - sweep.warmup + 1}/{sweep.repeats}"
            say(f"calibrate: {what} done in {time.monotonic() - began:.1f} s ({len(points)} points)")
    gc.unfreeze()
    return points


def split(points: Sequence[Measured]) -> tuple[list[Measured], list[Measured]]:
    """(fit, held out): per kind, sorted by size, alternating (recompute: a checkerboard over start x n).

    For recompute, points are grouped by start; within a group sorted by n, the parity of the position
    plus the group's index decides, so each start and each n lands in both halves.
    """
    fit: list[Measured] = []
    held: list[Measured] = []
    for kind in KINDS:
        group = sorted((p for p in points if p.kind == kind), key=lambda p: p.order)
        if kind != "recompute":
            for i, p in enumerate(group):
                # even positions fit; the largest size too (interpolate, never extrapolate)
                (fit if i % 2 == 0 or i == len(group) - 1 else held).append(p)
            continue
        starts = sorted({p.size[0] for p in group})
        for p in group:
            row = starts.index(p.size[0])
            col = sorted(q.size[1] for q in group if q.size[0] == p.size[0]).index(p.size[1])
            (fit if (row + col) % 2 == 0 else held).append(p)
    return fit, held


def error_summary(model: CostModel, points: Sequence[Measured]) -> dict[str, Any]:
    """The four error keys of `points` under `model` (None for a kind without points)."""
    errors: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for p in points:
        point = p.point()
        errors[p.kind].append(abs(predict(model, point) - point.seconds) / point.seconds)
    summary: dict[str, Any] = {f"{kind}_error": (round(statistics.median(e), 4) if e else None)
                               for kind, e in errors.items()}
    every = [x for e in errors.values() for x in e]
    summary["median_abs_rel_error"] = round(statistics.median(every), 4) if every else None
    return summary


def _point_rows(model: CostModel, points: Sequence[Measured], role: str) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        row = p.to_dict()
        predicted = predict(model, p.point())
        row.update(role=role, predicted_s=predicted, rel_error=abs(predicted - p.seconds) / p.seconds)
        rows.append(row)
    return rows


def coefficients(model: CostModel) -> dict[str, Any]:
    """The fitted coefficients (and the derived bandwidths in GB/s) of a calibrated model."""
    out: dict[str, Any] = {}
    for name in sorted(model.fitted):
        if name == "recompute":
            out[name] = model.recompute.to_dict()
        else:
            cost = model.path(name)
            out[name] = {**cost.to_dict(), "block_s": cost.block_s, "gbps": cost.bytes_per_block / cost.block_s / 1e9,
                         "bytes_per_block": cost.bytes_per_block}
    return out


@dataclass(frozen=True, slots=True)
class Calibration:
    """What one calibration run produced: the fitted model and the report (`report` is the JSON)."""

    model: CostModel
    report: dict[str, Any]


def calibrate(model: str | Mapping[str, Any], sweep: Sweep = DEFAULT_SWEEP, *, disk_dir: str | None,
              block_tokens: int = 64, base_profile: str = "cpu-this-machine", progress: Progress | None = None,
              seed: int = 0) -> Calibration:
    """Measures `sweep`, fits the cost model on half the points and reports its errors on the other half.

    Args:
        model: a preset name or a HF config dict.
        sweep: the points (DEFAULT_SWEEP, QUICK_SWEEP or your own).
        disk_dir: directory for the cold-disk store (None: no disk restores; the disk path stays derived).
        block_tokens: tokens per block of the restores.
        base_profile: the profile whose derived values the unmeasured paths keep.
        progress: called with progress lines.

    Returns:
        the model fitted on the fit half (what `--out` saves) and the report: the four error keys,
        `coefficients`, `points` (every point, its samples, prediction and role), `sweep`, `wall_s`.

    Raises:
        ConfigError: a bad model or sweep.
    """
    began = time.monotonic()
    base = CostModel.from_profile(base_profile, model, block_tokens=block_tokens)
    points = measure(base.spec, base.config, sweep, disk_dir=disk_dir, progress=progress, seed=seed)
    fit_half, held_out = split(points)
    fitted = fit_model(base, [p.point() for p in fit_half])
    profile = fitted.profile.with_(
        name=f"calibrated-{base.model.split('/')[-1].lower()}",
        description=f"measured by `kvtier calibrate` on this machine, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    fitted = replace(fitted, profile=profile)
    report: dict[str, Any] = {"model": fitted.model, **error_summary(fitted, held_out),
                              "fit_error": error_summary(fitted, fit_half)["median_abs_rel_error"],
                              "num_points": len(points), "num_held_out": len(held_out),
                              "coefficients": coefficients(fitted),
                              "points": _point_rows(fitted, fit_half, "fit") + _point_rows(fitted, held_out, "held_out"),
                              "sweep": _sweep_dict(sweep), "spec": base.spec.fields()}
    report["wall_s"] = round(time.monotonic() - began, 1)
    return Calibration(fitted, report)


def check(cost_model: CostModel, sweep: Sweep = CHECK_SWEEP, *, disk_dir: str | None,
          progress: Progress | None = None, seed: int = 1) -> dict[str, Any]:
    """Measures `sweep` again and reports the errors of a saved (calibrated) model on every point.

    Returns:
        the four error keys, `points` (each with its prediction), `sweep`, `wall_s`.
    """
    began = time.monotonic()
    points = measure(cost_model.spec, cost_model.config, sweep, disk_dir=disk_dir, progress=progress, seed=seed)
    report = {"model": cost_model.model, "profile": cost_model.profile.name, **error_summary(cost_model, points),
              "coefficients": coefficients(cost_model), "points": _point_rows(cost_model, points, "check"),
              "sweep": _sweep_dict(sweep)}
    report["wall_s"] = round(time.monotonic() - began, 1)
    return report


def _sweep_dict(sweep: Sweep) -> dict[str, Any]:
    return {"restore_blocks": list(sweep.restore_blocks), "recompute_points": [list(p) for p in sweep.recompute_points],
            "repeats": sweep.repeats, "warmup": sweep.warmup, "threads": sweep.threads,
            "restore_samples": sweep.restore_samples, "disk_samples": sweep.disk_samples, "host_batch_blocks": sweep.host_batch_blocks,
            "disk_batch_blocks": sweep.disk_batch_blocks, "recompute_batch_tokens": sweep.recompute_batch_tokens}


__all__ = ["CHECK_SWEEP", "DEFAULT_SWEEP", "KINDS", "QUICK_SWEEP", "Calibration", "Measured", "Sweep", "calibrate",
           "check", "coefficients", "error_summary", "measure", "resolve_model", "split"]
