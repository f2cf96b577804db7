"""The network profile of a remote tier, measured (`kvtier calibrate --remote`): round trip and restore bandwidth.

Primitives:
- `NetworkMeasurement`: `rtt_s` (median of one-key probes: one round trip to one node), `bytes_per_s` and
  `latency_s` (a line t(n) = latency + n x bytes_per_block / bytes_per_s fitted to the median restore time
  of n blocks on the fit half of the sizes), the points and `remote_error` (median |predicted - measured| /
  measured on the held-out half, as `kvtier calibrate` reports its other paths).
- `measure_network(spec, url, ...)`: saves blocks under a calibration salt, times `RemoteTier.get_many` of
  several sizes in rounds (each size once per round, in a fresh random order), probes, deletes the blocks.
- `with_network(cost_model, measurement)`: the cost model with the measured network profile
  (`remote_bytes_per_s`, `remote_rtt_s`) and its remote path derived from it again.

Invariant: the blocks it saves are its own (a salt of their own) and are deleted at the end.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import KVSpec

SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True, slots=True)
class NetworkMeasurement:
    """A measured network profile (see the module docstring)."""

    rtt_s: float
    latency_s: float
    bytes_per_s: float
    remote_error: float
    points: tuple[tuple[int, float, str], ...]  # (blocks, median seconds, "fit" | "held_out")

    def to_dict(self) -> dict[str, Any]:
        return {"remote_rtt_ms": round(self.rtt_s * 1e3, 4), "remote_latency_ms": round(self.latency_s * 1e3, 4),
                "remote_gbps": round(self.bytes_per_s / 1e9, 4), "restore_remote_error": round(self.remote_error, 4),
                "remote_points": [{"blocks": n, "median_ms": round(s * 1e3, 3), "role": role}
                                  for n, s, role in self.points]}


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares intercept and slope, both clamped at >= 0 (a time never falls with size)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 1e-12) if var else 1e-12
    return max(my - slope * mx, 0.0), slope


def measure_network(spec: KVSpec, url: str, *, timeout_s: float = 10.0, sizes: Sequence[int] = SIZES,
                    repeats: int = 5, progress: Callable[[str], None] | None = None,
                    seed: int = 0) -> NetworkMeasurement:
    """Measures the remote at `url` with blocks of `spec` (see the module docstring).

    Raises:
        ConfigError: fewer than 4 sizes or 3 repeats.
        RemoteError: the remote cannot be reached (or refuses the credentials).
    """
    import numpy as np
    import torch

    from kvtier.tiers.keys import KeyChain
    from kvtier.tiers.remote import RemoteTier

    sizes = sorted(set(int(n) for n in sizes))
    if len(sizes) < 4 or sizes[0] < 1:
        raise ConfigError(f"sizes: expected at least 4 distinct positive block counts, got {sizes}")
    if repeats < 3:
        raise ConfigError(f"repeats: expected >= 3, got {repeats}")
    rng = np.random.default_rng(seed)
    tier = RemoteTier(spec, url, timeout_s=timeout_s, salt=f"kvtier-calibrate-{time.time_ns()}")
    try:
        most = sizes[-1]
        keys = KeyChain.for_spec(spec).keys(rng.integers(0, 30000, most * spec.block_tokens))
        blocks = [torch.from_numpy(rng.integers(0, 256, spec.bytes_per_block, dtype=np.uint8)) for _ in keys]
        outs = [torch.empty(spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
        if tier.save_many(keys, blocks):
            raise ConfigError(f"remote {tier.settings.describe()}: could not store the calibration blocks")
        tier.get_many(keys, outs)  # warm-up: connections to every node
        rtts = []
        for _ in range(10 * repeats):
            start = time.perf_counter()
            tier.probe(keys[:1])
            rtts.append(time.perf_counter() - start)
        samples: dict[int, list[float]] = {n: [] for n in sizes}
        order = random.Random(seed)
        for r in range(repeats):
            if progress:
                progress(f"remote round {r + 1}/{repeats}")
            for n in order.sample(sizes, len(sizes)):
                start = time.perf_counter()
                found = tier.get_many(keys[:n], outs[:n])
                samples[n].append(time.perf_counter() - start)
                if not all(found):
                    raise ConfigError(f"remote {tier.settings.describe()}: calibration blocks went missing")
        for key in keys:
            tier.delete(key)
    finally:
        tier.close()
    medians = {n: statistics.median(v) for n, v in samples.items()}
    fit = sizes[::2] if sizes[-1] in sizes[::2] else [*sizes[::2], sizes[-1]]
    held = [n for n in sizes if n not in fit]
    latency, per_block = _fit_line(fit, [medians[n] for n in fit])
    errors = [abs(latency + per_block * n - medians[n]) / medians[n] for n in held]
    points = tuple((n, medians[n], "fit" if n in fit else "held_out") for n in sizes)
    return NetworkMeasurement(statistics.median(rtts), latency, spec.bytes_per_block / per_block,
                              statistics.median(errors) if errors else 0.0, points)


def with_network(cost_model: Any, measurement: NetworkMeasurement) -> Any:
    """`cost_model` with the measured network profile; its remote path is derived from it again."""
    from .model import CostModel

    profile = cost_model.profile.with_(remote_bytes_per_s=measurement.bytes_per_s, remote_rtt_s=measurement.rtt_s)
    derived = CostModel.from_profile(profile, cost_model.config, spec=cost_model.spec, tp=cost_model.tp,
                                     copy_granularity=cost_model.copy_granularity)
    paths = dict(cost_model.paths)
    paths["remote"] = derived.paths["remote"]
    return replace(cost_model, profile=profile, paths=paths)
