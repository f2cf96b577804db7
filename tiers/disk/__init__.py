"""The `disk` tier: an LMDB store of checked block values (format, environment, reads, writer, store).

`DiskTier` is the tier; `format` defines the value header every stored block carries.
"""

from kvtier.tiers.disk.store import DiskStats, DiskTier

__all__ = ["DiskStats", "DiskTier"]
