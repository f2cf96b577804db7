"""The `disk` tier: an LMDB store of checked block values (format, environment, reads, writer, store).

`DiskTier` is the tier; `format` defines the value header every stored block carries. `DiskTier` and
`DiskStats` are imported on first use, so importing a submodule (`disk.env`, `disk.format`) does not
import torch (the hit-only and simulation paths never do).
"""

from typing import Any

__all__ = ["DiskStats", "DiskTier"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvtier.tiers.disk import store

        return getattr(store, name)
    raise AttributeError(f"module 'kvtier.tiers.disk' has no attribute {name!r}")
