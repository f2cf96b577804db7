"""The disk store's counters, its map sizing, and how LMDB failures become kvtier errors.

- `DiskStats`: a snapshot of a disk tier's counters;
- `default_map_size(num_slots, bytes_per_block)`: the LMDB map a capacity needs;
- `store_error(path, what, err)`: `StoreFullError` when the file system is full, else `StoreError`.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import lmdb

from kvtier.tiers.disk.format import HEADER_BYTES
from kvtier.tiers.errors import StoreError, StoreFullError

PAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class DiskStats:
    """A snapshot of a disk tier's counters (this object's reads and writes, this spec's stored blocks).

    Attributes:
        hits / misses: blocks found and delivered / not delivered (absent, corrupt or foreign).
        corrupt: values that failed their checksum or whose header was malformed (removed).
        foreign: values whose header named another model or block (removed).
        acknowledged_blocks: blocks whose write transaction committed.
        bytes_read / bytes_written: stored bytes (header + payload) read from / written to the store.
        stored_bytes: stored (compressed) payload bytes of this spec's blocks now in the store.
        num_blocks: this spec's blocks now in the store.
    """

    hits: int
    misses: int
    corrupt: int
    foreign: int
    acknowledged_blocks: int
    bytes_read: int
    bytes_written: int
    stored_bytes: int
    num_blocks: int


def default_map_size(num_slots: int, bytes_per_block: int) -> int:
    """Map size for `num_slots` blocks: payload + header + page rounding, doubled (copy-on-write keeps old
    pages until readers leave), plus 64 MiB for the B-trees."""
    per_block = -(-(bytes_per_block + HEADER_BYTES + 16) // PAGE_BYTES) * PAGE_BYTES
    return 2 * num_slots * per_block + (64 << 20)


def store_error(path: str, what: str, err: lmdb.Error, needed_bytes: int = 0) -> StoreError:
    """The kvtier error for an LMDB failure: StoreFullError when the file system is full.

    LMDB reports a write that ran out of room part way as EIO ("short write"), so an I/O error on a file
    system with less free space than the write needed counts as full too.
    """
    text = str(err)
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text
    if not full and ("Input/output error" in text or getattr(err, "errno", None) == errno.EIO):
        try:
            st = os.statvfs(path)
            full = st.f_bavail * st.f_frsize < max(needed_bytes, 1 << 20)
        except OSError:
            pass
    if full:
        return StoreFullError(f"disk store {path!r}: file system full during {what}: {text}")
    return StoreError(f"disk store {path!r}: {what} failed: {text}")
