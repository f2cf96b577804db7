"""The kvtier exception tree, in one module.

`scheduler/` may import `tiers/` but never the reverse, so every kvtier error, the scheduler's
included, derives from `KVTierError` defined here. Expected outcomes (a shorter prefix, a miss, no
room) are return values, not exceptions.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """An argument or configuration value is invalid (names the argument and what was expected)."""


class SpecMismatchError(KVTierError, ValueError):
    """Data or a request does not match the KVSpec it is used with (shape, dtype, fingerprint)."""


class StoreFormatError(KVTierError):
    """A disk store was written in a format version this kvtier cannot read."""


class StoreError(KVTierError):
    """The disk store failed (cannot open or write the path, LMDB error)."""


class StoreFullError(StoreError):
    """The disk store (LMDB map or file system) has no room left for a write."""


class CorruptBlockError(KVTierError):
    """A stored block failed its checksum, fingerprint or key check (served as a miss, never as KV)."""


class CapacityError(KVTierError):
    """A tier has no free slot and nothing it may evict (every block pinned)."""


class TransferError(KVTierError):
    """A batched transfer failed as a whole."""


class TransferTimeout(TransferError, TimeoutError):
    """A wait on a transfer handle ran out of time."""


class TraceFormatError(KVTierError, ValueError):
    """A request trace is malformed (names the file, the line and what was wrong)."""


class ClosedError(KVTierError, RuntimeError):
    """An object was used after `close()`."""


class RemoteError(KVTierError):
    """The remote tier cannot start: no node reachable, wrong mode, or redis-py missing (calls after
    start never raise it: a failed call is a miss)."""


class RemoteAuthError(RemoteError, ConfigError):
    """The remote refused the credentials (a wrong or missing password), named at start."""
