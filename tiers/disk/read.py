"""Reading and checking one stored value of the disk tier, straight into its destination.

Primitives:
- `read_value_at(fd, offset, value_len, fingerprint, key, out, itemsize)`: reads a value from data.mdb at a
  file offset (`SharedEnv.locate_many`) and checks it; the raw codec's payload lands in `out` with one
  `os.preadv` (header and payload in one call), a compressed payload is read into a per-thread scratch
  buffer and decoded into `out`. The disk tier's read path: values read in file order this way stream
  at the speed of a cold sequential read of a file, provided LMDB's map does no readahead of its own
  (see `disk.env`: a fault in the map otherwise reads 8 MiB around it, synchronously, and the reads
  that follow are no longer sequential to the kernel).
- `check_value(src, fingerprint, key, out, itemsize)`: checks a whole value in memory (header, checksum)
  and decodes its payload into `out`.
- `Destination`: `out` of both: one block's contiguous bytes, or a list of memory runs that together
  take the payload in order (the raw codec's payload is then read straight into them, one `preadv`,
  and checksummed run by run).
- `scratch(size)`: a reused per-thread buffer (the raw codec's write path builds values in it too).

Both return None when the block was delivered, else the reason it was not: "corrupt" (malformed header,
impossible lengths, checksum or decoding failure), "foreign" (a well-formed header of another model or
block) or "short" (the file ended before the value: the offset was wrong). The checksum is always checked
before `out` is reported valid; after a failure `out`'s contents are undefined.
"""

from __future__ import annotations

import os
import threading

from typing import Any, Sequence, Union

import numpy as np
import xxhash

from kvtier.tiers.codecs import Codec, get_codec
from kvtier.tiers.disk.format import HEADER_BYTES, check_header, checksum, decode_header
from kvtier.tiers.errors import ConfigError, CorruptBlockError, SpecMismatchError
from kvtier.tiers.spec import KVSpec

_local = threading.local()

#: where a block's payload goes: a contiguous uint8 array of one block, or the block's payload bytes as
#: writable memory runs in payload order (an engine's own KV memory, see `KVBuffer.block_memory`)
Destination = Union[np.ndarray, Sequence[memoryview]]


def scratch(size: int, name: str = "scratch") -> memoryview:
    """A per-thread buffer of at least `size` bytes (grown when needed), as a view of exactly `size`;
    `name` tells apart buffers in use at the same time."""
    buf = getattr(_local, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_local, name, buf)
    return memoryview(buf)[:size]


def _head() -> memoryview:
    head = getattr(_local, "head", None)
    if head is None:
        head = _local.head = memoryview(bytearray(HEADER_BYTES))
    return head


def check_value(src: memoryview | bytes, fingerprint: bytes, key: bytes, out: Destination, itemsize: int) -> str | None:
    """Checks a whole value (header then payload) and decodes its payload into `out`.

    Returns:
        None when delivered, else "corrupt" or "foreign".
    """
    try:
        header = decode_header(src[:HEADER_BYTES])
    except CorruptBlockError:
        return "corrupt"
    runs = _runs(out)
    raw_len = sum(len(r) for r in runs)
    reason = check_header(header, fingerprint, key, len(src), raw_len)
    if reason is not None:
        return reason
    payload = src[HEADER_BYTES:]
    if checksum(payload) != header.checksum:
        return "corrupt"
    codec = get_codec(header.codec)
    try:
        if isinstance(out, np.ndarray):
            codec.decode_into(payload, out, itemsize)
        elif not codec.compresses:
            _scatter(payload, runs)
        else:  # decoded whole, then spread over the runs
            block = np.frombuffer(scratch(raw_len, "block"), dtype=np.uint8)  # `src` may be the "scratch" one
            codec.decode_into(payload, block, itemsize)
            _scatter(block.data, runs)
    except (CorruptBlockError, ConfigError):
        return "corrupt"
    return None


def read_value_at(fd: int, offset: int, value_len: int, fingerprint: bytes, key: bytes, out: Destination,
                  itemsize: int) -> str | None:
    """Reads the value of `value_len` bytes at `offset` of `fd` and checks it, decoding into `out`.

    Returns:
        None when delivered, else "corrupt", "foreign" or "short".
    """
    runs = _runs(out)
    raw_len = sum(len(r) for r in runs)
    if value_len < HEADER_BYTES:
        return "corrupt"
    if value_len == HEADER_BYTES + raw_len:
        # the raw codec's fast path: header and payload in one preadv, the payload lands in `out`
        head = _head()
        if os.preadv(fd, [head, *runs], offset) != value_len:
            return "short"
        try:
            header = decode_header(head)
        except CorruptBlockError:
            return "corrupt"
        if header.codec == Codec.NONE:
            reason = check_header(header, fingerprint, key, value_len, raw_len)
            if reason is not None:
                return reason
            return None if _checksum_runs(runs) == header.checksum else "corrupt"
        # a compressed payload exactly one block long: decode it from a copy below
    src = scratch(value_len)
    if os.preadv(fd, [src], offset) != value_len:
        return "short"
    return check_value(src, fingerprint, key, out, itemsize)


def _runs(out: Destination) -> list[memoryview]:
    return [out.data.cast("B")] if isinstance(out, np.ndarray) else list(out)


def _checksum_runs(runs: Sequence[memoryview]) -> int:
    """The checksum of the concatenated runs (equal to `checksum` of the same bytes in one piece)."""
    if len(runs) == 1:
        return checksum(runs[0])
    state = xxhash.xxh3_64()
    for run in runs:
        state.update(run)
    return state.intdigest()


def _scatter(src: memoryview | bytes, runs: Sequence[memoryview]) -> None:
    """Copies `src` over the runs in order (their lengths must add up to `len(src)`)."""
    if len(src) != sum(len(r) for r in runs):
        raise CorruptBlockError(f"payload of {len(src)} bytes, expected {sum(len(r) for r in runs)}")
    pos = 0
    for run in runs:
        run[:] = src[pos:pos + len(run)]
        pos += len(run)


def destination(spec: KVSpec, out: Any) -> Destination:
    """Where one block's payload is read to: a CPU tensor of exactly one block, or writable memory runs
    of one block's bytes (an engine's KV).

    Raises:
        ConfigError: a tensor not on the CPU.
        SpecMismatchError: not exactly one block of writable contiguous bytes.
    """
    import torch

    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu":
            raise ConfigError(f"get_many: outputs must be CPU tensors, got one on {out.device}")
        if not out.is_contiguous() or out.numel() * out.element_size() != spec.bytes_per_block:
            raise SpecMismatchError(f"out: expected {spec.bytes_per_block} bytes (one contiguous block of "
                                    f"{spec.model_id}), got shape {tuple(out.shape)} {out.dtype}")
        return out.reshape(-1).view(torch.uint8).numpy()
    runs = list(out)
    size = sum(r.nbytes for r in runs)
    if size != spec.bytes_per_block or any(r.readonly or not r.c_contiguous for r in runs):
        raise SpecMismatchError(f"out: memory runs of {size} bytes; expected {spec.bytes_per_block} "
                                f"writable contiguous bytes")
    return [r.cast("B") if r.format != "B" else r for r in runs]
