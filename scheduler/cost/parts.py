"""The parts a cost model is made of: restore paths and their costs, and the recompute cost.

- `RestorePath`: gpu, host, disk, disk_zstd (the disk tier with zstd-compressed blocks).
- `CopyGranularity`: how many separate copies one block costs on the host link: `block` (kvtier: one
  contiguous copy per block), `layer` (one per layer per block), `layer-kv` (one `cudaMemcpyAsync` per layer
  per K/V per block, the naive per-layer path).
- `PathCost`: restore time of n blocks over one path = latency_s + n x (per_block_s + copies_per_block x
  per_copy_s + bytes_per_block / bytes_per_s); 0 for n = 0. A path may have a ramp: below `ramp_bytes` in
  one transfer it runs slower than its bulk rate (a cold disk read: the kernel's readahead window still
  growing, fewer reader threads on a small restore), and n blocks then cost as many bulk blocks as
  `effective_blocks(n)` = R x (n / R)^ramp_exponent, R = ramp_bytes / bytes_per_block (n itself from R on).
- `RecomputeCost`: recompute time of tokens [start, start + n) = fixed_s + per_token_s x n +
  per_token_ctx_s x n x (start + n / 2) (causal attention: token p attends to p + 1 tokens); 0 for n = 0.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import KVSpec


class RestorePath(str, enum.Enum):
    """Where restored blocks come from."""

    GPU = "gpu"
    HOST = "host"
    DISK = "disk"
    DISK_ZSTD = "disk_zstd"
    #: the remote tier shared by serving replicas, over the network
    REMOTE = "remote"

    def __str__(self) -> str:
        return self.value


class CopyGranularity(str, enum.Enum):
    """How a block crosses the host link: copies per block."""

    BLOCK = "block"
    LAYER = "layer"
    LAYER_KV = "layer-kv"

    def __str__(self) -> str:
        return self.value

    def copies_per_block(self, spec: KVSpec) -> int:
        """Separate copies one block of `spec` costs at this granularity."""
        return {CopyGranularity.BLOCK: 1, CopyGranularity.LAYER: spec.num_layers,
                CopyGranularity.LAYER_KV: spec.num_layers * spec.kv_factor}[self]


def parse_enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is unknown; expected one of "
                          f"{', '.join(m.value for m in cls)}") from None


#: stands in for an infinite bandwidth (a path whose time does not depend on bytes); JSON has no inf
UNBOUNDED = 1e30


@dataclass(frozen=True, slots=True)
class PathCost:
    """Restore cost of blocks over one path (see the module docstring for the formula)."""

    latency_s: float
    bytes_per_s: float
    bytes_per_block: int
    per_block_s: float = 0.0
    per_copy_s: float = 0.0
    copies_per_block: int = 1
    ramp_bytes: float = 0.0
    ramp_exponent: float = 1.0

    def __post_init__(self) -> None:
        for name in ("latency_s", "per_block_s", "per_copy_s", "ramp_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"PathCost.{name}: expected a finite number >= 0, got {value!r}")
        if not (isinstance(self.bytes_per_s, (int, float)) and self.bytes_per_s > 0):
            raise ConfigError(f"PathCost.bytes_per_s: expected a number > 0, got {self.bytes_per_s!r}")
        if not (isinstance(self.ramp_exponent, (int, float)) and 0 < self.ramp_exponent <= 1):
            raise ConfigError(f"PathCost.ramp_exponent: expected a number in (0, 1], got {self.ramp_exponent!r}")

    @property
    def ramp_blocks(self) -> float:
        """R: the transfer size, in blocks, from which the path runs at its bulk rate (0: no ramp)."""
        return self.ramp_bytes / self.bytes_per_block if self.ramp_exponent < 1 and self.bytes_per_block > 0 else 0.0

    def ramp_factor(self, num_bytes: float) -> float:
        """How much slower than the bulk rate one transfer of `num_bytes` runs (1 from the ramp on)."""
        if self.ramp_exponent >= 1 or num_bytes <= 0 or num_bytes >= self.ramp_bytes:
            return 1.0
        return (self.ramp_bytes / num_bytes) ** (1 - self.ramp_exponent)

    def effective_blocks(self, num_blocks: float) -> float:
        """The bulk blocks `num_blocks` blocks in one transfer cost (more than n below the ramp)."""
        return num_blocks * self.ramp_factor(num_blocks * self.bytes_per_block) if num_blocks > 0 else 0.0

    def blocks_within(self, effective: float) -> float:
        """The inverse of `effective_blocks`: how many blocks one transfer moves in `effective` bulk blocks."""
        ramp = self.ramp_blocks
        if effective <= 0 or effective >= ramp:
            return max(effective, 0.0)
        return ramp * (effective / ramp) ** (1 / self.ramp_exponent)

    @property
    def block_s(self) -> float:
        """Marginal seconds per block."""
        return self.per_block_s + self.copies_per_block * self.per_copy_s + self.bytes_per_block / self.bytes_per_s

    def time_s(self, num_blocks: int) -> float:
        """Seconds to restore `num_blocks` blocks over this path in one batched transfer."""
        return 0.0 if num_blocks <= 0 else self.latency_s + self.effective_blocks(num_blocks) * self.block_s

    def to_dict(self) -> dict[str, float]:
        """The coefficients (bytes and copies per block follow from the spec); the ramp's where it has one."""
        out = {"latency_s": self.latency_s, "per_block_s": self.per_block_s, "per_copy_s": self.per_copy_s,
               "bytes_per_s": self.bytes_per_s}
        if self.ramp_blocks:
            out.update(ramp_bytes=self.ramp_bytes, ramp_exponent=self.ramp_exponent)
        return out


@dataclass(frozen=True, slots=True)
class RecomputeCost:
    """Prefill cost of tokens [start, start + n) given the first `start` tokens' KV."""

    fixed_s: float
    per_token_s: float
    per_token_ctx_s: float

    def __post_init__(self) -> None:
        for name in ("fixed_s", "per_token_s", "per_token_ctx_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"RecomputeCost.{name}: expected a finite number >= 0, got {value!r}")

    def time_s(self, start_tokens: int, num_tokens: int) -> float:
        """Seconds to compute `num_tokens` tokens after `start_tokens` cached ones (0 for none)."""
        if num_tokens <= 0:
            return 0.0
        return self.fixed_s + num_tokens * (self.per_token_s + self.per_token_ctx_s * (start_tokens + num_tokens / 2))

    def to_dict(self) -> dict[str, float]:
        """The three coefficients."""
        return {"fixed_s": self.fixed_s, "per_token_s": self.per_token_s, "per_token_ctx_s": self.per_token_ctx_s}
