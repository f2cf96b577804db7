"""Reading and checking one stored value of the disk tier, straight into its destination.

Primitives:
- `read_value_at(fd, offset, value_len, fingerprint, key, out, itemsize)`: reads a value from data.mdb at a
  file offset (`SharedEnv.locate`) and checks it; the raw codec's payload lands in `out` with one
  `os.preadv` (header and payload in one call), a compressed payload is read into a per-thread scratch
  buffer and decoded into `out`. Not the tier's read path: measured on this machine (virtio disk, 8 MiB
  blocks, cold), it ran at 0.35-0.40 of a sequential read against 0.87-0.89 for copying from LMDB's map,
  because LMDB's lookup touches each value's first page and the kernel then treats the preads as random.
  Kept for stores on other file systems and for benchmarks.
- `check_value(src, fingerprint, key, out, itemsize)`: checks a whole value in memory (header, checksum)
  and decodes its payload into `out`.
- `scratch(size)`: a reused per-thread buffer (the raw codec's write path builds values in it too).

Both return None when the block was delivered, else the reason it was not: "corrupt" (malformed header,
impossible lengths, checksum or decoding failure), "foreign" (a well-formed header of another model or
block) or "short" (the file ended before the value: the offset was wrong). The checksum is always checked
before `out` is reported valid; after a failure `out`'s contents are undefined.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .codecs import Codec, get_codec
from .diskformat import HEADER_BYTES, check_header, checksum, decode_header
from .errors import ConfigError, CorruptBlockError

_local = threading.local()


def scratch(size: int) -> memoryview:
    """A per-thread buffer of at least `size` bytes (grown when needed), as a view of exactly `size`."""
    buf = getattr(_local, "scratch", None)
    if buf is None or len(buf) < size:
        buf = _local.scratch = bytearray(size)
    return memoryview(buf)[:size]


def _head() -> memoryview:
    head = getattr(_local, "head", None)
    if head is None:
        head = _local.head = memoryview(bytearray(HEADER_BYTES))
    return head


def check_value(src: memoryview | bytes, fingerprint: bytes, key: bytes, out: np.ndarray, itemsize: int) -> str | None:
    """Checks a whole value (header then payload) and decodes its payload into `out`.

    Returns:
        None when delivered, else "corrupt" or "foreign".
    """
    try:
        header = decode_header(src[:HEADER_BYTES])
    except CorruptBlockError:
        return "corrupt"
    reason = check_header(header, fingerprint, key, len(src), out.size)
    if reason is not None:
        return reason
    payload = src[HEADER_BYTES:]
    if checksum(payload) != header.checksum:
        return "corrupt"
    try:
        get_codec(header.codec).decode_into(payload, out, itemsize)
    except (CorruptBlockError, ConfigError):
        return "corrupt"
    return None


def read_value_at(fd: int, offset: int, value_len: int, fingerprint: bytes, key: bytes, out: np.ndarray,
                  itemsize: int) -> str | None:
    """Reads the value of `value_len` bytes at `offset` of `fd` and checks it, decoding into `out`.

    Returns:
        None when delivered, else "corrupt", "foreign" or "short".
    """
    raw_len = out.size
    if value_len < HEADER_BYTES:
        return "corrupt"
    if value_len == HEADER_BYTES + raw_len:
        # the raw codec's fast path: header and payload in one preadv, the payload lands in `out`
        head = _head()
        if os.preadv(fd, [head, out.data], offset) != value_len:
            return "short"
        try:
            header = decode_header(head)
        except CorruptBlockError:
            return "corrupt"
        if header.codec == Codec.NONE:
            reason = check_header(header, fingerprint, key, value_len, raw_len)
            if reason is not None:
                return reason
            return None if checksum(out) == header.checksum else "corrupt"
        # a compressed payload exactly one block long: decode it from a copy below
    src = scratch(value_len)
    if os.preadv(fd, [src], offset) != value_len:
        return "short"
    return check_value(src, fingerprint, key, out, itemsize)
