"""The parts a cost model is made of: restore paths and their costs, and the recompute cost.

- `RestorePath`: gpu, host, disk, disk_zstd (the disk tier with zstd-compressed blocks).
- `CopyGranularity`: how many separate copies one block costs on the host link: `block` (kvtier: one
  contiguous copy per block), `layer` (one per layer per block), `layer-kv` (one `cudaMemcpyAsync` per layer
  per K/V per block, the naive per-layer path).
- `PathCost`: restore time of n blocks over one path = latency_s + n x (per_block_s + copies_per_block x
  per_copy_s + bytes_per_block / bytes_per_s); 0 for n = 0.
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

    def __post_init__(self) -> None:
        for name in ("latency_s", "per_block_s", "per_copy_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"PathCost.{name}: expected a finite number >= 0, got {value!r}")
        if not (isinstance(self.bytes_per_s, (int, float)) and self.bytes_per_s > 0):
            raise ConfigError(f"PathCost.bytes_per_s: expected a number > 0, got {self.bytes_per_s!r}")

    @property
    def block_s(self) -> float:
        """Marginal seconds per block."""
        return self.per_block_s + self.copies_per_block * self.per_copy_s + self.bytes_per_block / self.bytes_per_s

    def time_s(self, num_blocks: int) -> float:
        """Seconds to restore `num_blocks` blocks over this path in one batched transfer."""
        return 0.0 if num_blocks <= 0 else self.latency_s + num_blocks * self.block_s

    def to_dict(self) -> dict[str, float]:
        """The coefficients (bytes and copies per block follow from the spec)."""
        return {"latency_s": self.latency_s, "per_block_s": self.per_block_s, "per_copy_s": self.per_copy_s,
                "bytes_per_s": self.bytes_per_s}


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
