"""Fitting the cost model to measured times (what `kvtier calibrate` builds on).

Primitives:
- `RestorePoint(path, num_blocks, seconds, num_bytes=None)`: one measured restore of `num_blocks` blocks
  (`num_bytes` when the sweep varies the block size; by default blocks x the model's bytes per block).
- `RecomputePoint(start_tokens, num_tokens, seconds)`: one measured prefill of tokens [start, start + n).
- `fit_model(model, points)` (also `CostModel.fit`): refits each part the points measure:
  a restore path -> latency_s + per_block_s x blocks + bytes / bytes_per_s (per_copy_s folded in: the
  measurement already paid its copies), with a ramp up to the largest transfer measured (`PathCost`:
  blocks and bytes scaled by (R / bytes)^(1 - exponent) below R) where it cuts the mean relative error
  by at least `RAMP_MIN_GAIN`; recompute -> fixed_s + per_token_s x n + per_token_ctx_s x n x
  (start + n / 2).
- `predict(model, point)`, `relative_errors(model, points)`: predicted seconds and |pred - meas| / meas.

Invariants:
- the fit minimises relative error (each row weighted by 1 / seconds: calibrate reports relative errors)
  with non-negative coefficients (a negative one is dropped to 0 and the rest refitted), robustly: a
  Huber loss on the relative residuals (iteratively reweighted least squares, the threshold 1.345 x the
  residuals' MAD scale), so one point a neighbour's burst of I/O or CPU made 3x slower moves the fit
  as much as a point 1.345 sigma off, not 9x more (on a shared machine a cold disk read swung 0.3x-5x);
  exact points are fitted exactly;
- when every point of a path has the same bytes per block, bytes and blocks are one column and the slope
  is reported as a bandwidth (per_block_s = 0), so the path scales with the block size;
- numpy only, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.cost.parts import UNBOUNDED, PathCost, RecomputeCost, RestorePath

from kvtier.scheduler.cost.parts import parse_enum

if TYPE_CHECKING:
    from kvtier.scheduler.cost.model import CostModel


@dataclass(frozen=True, slots=True)
class RestorePoint:
    """One measured restore: `num_blocks` blocks over `path` took `seconds`."""

    path: str
    num_blocks: int
    seconds: float
    num_bytes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", parse_enum(RestorePath, self.path, "RestorePoint.path").value)
        _check_count("RestorePoint.num_blocks", self.num_blocks)
        _check_seconds("RestorePoint.seconds", self.seconds)
        if self.num_bytes is not None:
            _check_count("RestorePoint.num_bytes", self.num_bytes)


@dataclass(frozen=True, slots=True)
class RecomputePoint:
    """One measured prefill of tokens [start_tokens, start_tokens + num_tokens) that took `seconds`."""

    start_tokens: int
    num_tokens: int
    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.start_tokens, int) or self.start_tokens < 0:
            raise ConfigError(f"RecomputePoint.start_tokens: expected an int >= 0, got {self.start_tokens!r}")
        _check_count("RecomputePoint.num_tokens", self.num_tokens)
        _check_seconds("RecomputePoint.seconds", self.seconds)


def _check_count(what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what}: expected a positive int, got {value!r}")


def _check_seconds(what: str, value: object) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: expected a finite number of seconds > 0, got {value!r}")


#: Huber threshold in units of the residuals' robust scale (95% efficiency under Gaussian noise)
HUBER_K = 1.345
#: IRLS rounds of the robust fit (it settles in a handful on calibration sweeps)
HUBER_ROUNDS = 20


def _nonneg_lstsq(columns: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Huber fit of relative error with coefficients >= 0 (see the module docstring)."""
    weights = 1.0 / seconds
    a = columns * weights[:, None]
    b = seconds * weights  # ones: the relative residual of row i is (a[i] @ coeffs - 1)
    robust = np.ones_like(b)
    coeffs = _nonneg_weighted(a, b, robust)
    for _ in range(HUBER_ROUNDS):
        residual = a @ coeffs - b
        scale = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        if scale <= 1e-12:
            break  # (nearly) every point on the fit: nothing to down-weight
        cut = HUBER_K * scale
        new = np.minimum(1.0, cut / np.maximum(np.abs(residual), 1e-300))
        if np.allclose(new, robust, rtol=1e-6, atol=1e-9):
            break
        robust = new
        coeffs = _nonneg_weighted(a, b, robust)
    return coeffs


def _nonneg_weighted(a: np.ndarray, b: np.ndarray, row_weights: np.ndarray) -> np.ndarray:
    """Weighted least squares with coefficients >= 0 (drops the most negative and refits)."""
    root = np.sqrt(row_weights)
    a, b = a * root[:, None], b * root
    active = list(range(a.shape[1]))
    coeffs = np.zeros(a.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (solution >= 0).all():
            coeffs[active] = solution
            break
        del active[int(np.argmin(solution))]
    return coeffs


#: ramp exponents tried for a restore path (1: no ramp; see `PathCost`)
RAMP_EXPONENTS = tuple(round(0.5 + 0.02 * i, 2) for i in range(26))
#: a ramp is kept only when it cuts the fit's mean relative error by at least this share (else the
#: straight line: a linear path's noise must not buy it a curve)
RAMP_MIN_GAIN = 0.15
#: ... and only when the line misses the points by at least this much on average
RAMP_MIN_ERROR = 0.02


def _fit_path(base: PathCost, points: Sequence[RestorePoint]) -> PathCost:
    """The straight line, or the line with a ramp up to the largest transfer measured when that fits the
    points clearly better (a cold disk: small restores slower per byte than large ones)."""
    blocks = np.array([p.num_blocks for p in points], dtype=float)
    if len(set(blocks.tolist())) < 2:
        raise ConfigError(f"fit: restore path {points[0].path!r} needs points at >= 2 distinct block counts, "
                          f"got {sorted(set(blocks.tolist()))}")
    nbytes = np.array([p.num_bytes if p.num_bytes is not None else p.num_blocks * base.bytes_per_block
                       for p in points], dtype=float)
    seconds = np.array([p.seconds for p in points])
    line = _fit_line(base, blocks, nbytes, seconds, 0.0, 1.0)
    line_error = _mean_error(line, points)
    best, best_error = line, line_error
    if len(set(blocks.tolist())) >= 4 and line_error >= RAMP_MIN_ERROR:  # a curve needs more points than terms
        for exponent in RAMP_EXPONENTS[:-1]:
            curve = _fit_line(base, blocks, nbytes, seconds, float(nbytes.max()), exponent)
            error = _mean_error(curve, points)
            if error < best_error:
                best, best_error = curve, error
    return best if best_error <= (1 - RAMP_MIN_GAIN) * line_error else line


def _fit_line(base: PathCost, blocks: np.ndarray, nbytes: np.ndarray, seconds: np.ndarray, ramp_bytes: float,
              exponent: float) -> PathCost:
    """latency + per block + per byte, each transfer's blocks and bytes scaled by its ramp factor."""
    shape = replace(base, ramp_bytes=ramp_bytes, ramp_exponent=exponent)
    factor = np.array([shape.ramp_factor(b) for b in nbytes])
    blocks, nbytes = blocks * factor, nbytes * factor
    per_block_bytes = nbytes / blocks
    ones = np.ones_like(blocks)
    if np.ptp(per_block_bytes) <= 1e-9 * per_block_bytes.max():
        latency, per_byte = _nonneg_lstsq(np.column_stack([ones, nbytes]), seconds)
        per_block = 0.0
    else:
        latency, per_block, per_byte = _nonneg_lstsq(np.column_stack([ones, blocks, nbytes]), seconds)
    return replace(shape, latency_s=float(latency), per_block_s=float(per_block), per_copy_s=0.0,
                   bytes_per_s=float(1.0 / per_byte) if per_byte > 0 else UNBOUNDED)


def _mean_error(cost: PathCost, points: Sequence[RestorePoint]) -> float:
    return float(np.mean([abs(_predict_restore(cost, p) - p.seconds) / p.seconds for p in points]))


def _fit_recompute(points: Sequence[RecomputePoint]) -> RecomputeCost:
    if len({(p.start_tokens, p.num_tokens) for p in points}) < 3:
        raise ConfigError("fit: recompute needs points at >= 3 distinct (start_tokens, num_tokens) pairs, "
                          f"got {len({(p.start_tokens, p.num_tokens) for p in points})}")
    n = np.array([p.num_tokens for p in points], dtype=float)
    start = np.array([p.start_tokens for p in points], dtype=float)
    seconds = np.array([p.seconds for p in points])
    fixed, per_token, per_ctx = _nonneg_lstsq(np.column_stack([np.ones_like(n), n, n * (start + n / 2)]), seconds)
    return RecomputeCost(fixed_s=float(fixed), per_token_s=float(per_token), per_token_ctx_s=float(per_ctx))


def fit_model(model: "CostModel", points: Iterable[RestorePoint | RecomputePoint]) -> "CostModel":
    """A copy of `model` with every part that `points` measure refitted (the rest unchanged).

    Raises:
        ConfigError: a point of an unknown type, or too few distinct points for a part.
    """
    by_path: dict[str, list[RestorePoint]] = {}
    recompute: list[RecomputePoint] = []
    for point in points:
        if isinstance(point, RestorePoint):
            by_path.setdefault(point.path, []).append(point)
        elif isinstance(point, RecomputePoint):
            recompute.append(point)
        else:
            raise ConfigError(f"fit: expected RestorePoint or RecomputePoint, got {type(point).__name__}")
    paths = dict(model.paths)
    for name, group in by_path.items():
        paths[name] = _fit_path(model.paths[name], group)
    fitted = set(model.fitted) | set(by_path)
    new_recompute = model.recompute
    if recompute:
        new_recompute = _fit_recompute(recompute)
        fitted.add("recompute")
    return replace(model, paths=paths, recompute=new_recompute, fitted=frozenset(fitted))


def predict(model: "CostModel", point: RestorePoint | RecomputePoint) -> float:
    """Predicted seconds of a measured point under `model`."""
    if isinstance(point, RecomputePoint):
        return model.recompute_s(point.start_tokens, point.num_tokens)
    return _predict_restore(model.path(point.path), point)


def _predict_restore(cost: PathCost, point: RestorePoint) -> float:
    if point.num_bytes is None:
        return cost.time_s(point.num_blocks)
    per_block = cost.per_block_s + cost.copies_per_block * cost.per_copy_s
    return cost.latency_s + cost.ramp_factor(point.num_bytes) * (
        point.num_blocks * per_block + point.num_bytes / cost.bytes_per_s)


def relative_errors(model: "CostModel", points: Iterable[RestorePoint | RecomputePoint]) -> list[float]:
    """|predicted - measured| / measured of each point, in order."""
    return [abs(predict(model, p) - p.seconds) / p.seconds for p in points]
