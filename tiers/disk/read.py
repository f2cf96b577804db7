"""Reading and checking one stored value of the disk tier, straight into its destination.

Primitives:
- `read_value_at(fd, offset, value_len, fingerprint, key, out, itemsize)`: reads a value from data.mdb at a
  file offset (`SharedEnv.locate_many`) and checks it; the raw codec's payload lands in `out` with one
  `preadv` (header and payload in one call; `fd` a plain descriptor, or a `disk.uncached.UncachedFile`
  that reads around the page cache), a compressed payload is read into a per-thread scratch
  buffer and decoded into `out`. The disk tier's read path: values read in file order this way stream
  at the speed of a cold sequential read of a file, provided LMDB's map does no readahead of its own
  (see `disk.env`: a fault in the map otherwise reads 8 MiB around it, synchronously, and the reads
  that follow are no longer sequential to the kernel).
- `check_value(src, fingerprint, key, out, itemsize)`: checks a whole value in memory (header, checksum)
  and decodes its payload into `out`.
- `Destination`: `out` of both: one block's contiguous bytes, or a list of memory runs that together
  take the payload in order (the raw codec's payload is then read straight into them, one `preadv`,
  and checksummed run by run).
- `PartedValue(...)`: one raw value read in parts (layer groups) in order, `read(fd, part)` each: part 0
  with the header, the checksum carried over the parts and decided with the last one; what an engine's
  layer-by-layer disk restore reads (`DiskTier.get_many(..., layer_groups=...)`). A compressed value is
  read whole with part 0. `extent(part)`: the file bytes `read` will read for that part (what a reader
  asks the kernel to fetch ahead, see `disk.readers`).
- `scratch(size)`: a reused per-thread buffer (the raw codec's write path builds values in it too).

Both return None when the block was delivered, else the reason it was not: "corrupt" (malformed header,
impossible lengths, checksum or decoding failure), "foreign" (a well-formed header of another model or
block) or "short" (the file ended before the value: the offset was wrong). The checksum is always checked
before `out` is reported valid; after a failure `out`'s contents are undefined. A `PartedValue`'s earlier
parts are in `out` before its checksum is decided: whoever uses them before the verdict must drop what
it computed from them when the verdict is a failure (an engine recomputes the pass).
"""

from __future__ import annotations

import os
import threading

from typing import Any, Sequence, Union

import numpy as np
import xxhash

from kvtier.tiers.codecs import Codec, get_codec
from kvtier.tiers.disk.format import HEADER_BYTES, check_header, checksum, decode_header
from kvtier.tiers.disk.uncached import Readable, preadv
from kvtier.tiers.errors import ConfigError, CorruptBlockError, SpecMismatchError
from kvtier.tiers.spec import KVSpec

_local = threading.local()

#: where a block's payload goes: a contiguous uint8 array of one block, or the block's payload bytes as
#: writable memory runs in payload order (memory laid out by layer, K/V and head, as an engine's KV may be)
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


def read_value_at(fd: Readable, offset: int, value_len: int, fingerprint: bytes, key: bytes, out: Destination,
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
        if preadv(fd, [head, *runs], offset) != value_len:
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
    if preadv(fd, [src], offset) != value_len:
        return "short"
    return check_value(src, fingerprint, key, out, itemsize)


class PartedValue:
    """One value of the disk tier read in parts, each a contiguous byte range of its payload (a layer
    group of the block), in order on one thread (see the module docstring)."""

    __slots__ = ("offset", "value_len", "fingerprint", "key", "out", "itemsize", "parts", "reason", "_bounds",
                 "_hash", "_checksum")

    def __init__(self, offset: int, value_len: int, fingerprint: bytes, key: bytes, out: Destination, itemsize: int,
                 bounds: Sequence[int]) -> None:
        """
        Args:
            offset, value_len: where the value is in the file (`SharedEnv.locate_many`).
            fingerprint, key, out, itemsize: as `read_value_at`'s.
            bounds: the parts' payload byte offsets, increasing from 0 to the block's size.
        """
        runs = _runs(out)
        raw_len = sum(len(r) for r in runs)
        self.offset, self.value_len, self.fingerprint, self.key = offset, value_len, fingerprint, key
        self.out, self.itemsize = out, itemsize
        # a value of another length is compressed (or corrupt): read whole with part 0
        self.parts = _split_runs(runs, bounds) if value_len == HEADER_BYTES + raw_len else None
        self._bounds = bounds
        self.reason: str | None = None
        self._hash = xxhash.xxh3_64()
        self._checksum = 0

    def read(self, fd: Readable, part: int) -> str | None:
        """Reads part `part` (parts are read 0, 1, ... in turn) into `out`.

        Returns:
            the reason the value failed, once known ("corrupt", "foreign", "short"), else None; None after
            the last part means delivered, checksum included.
        """
        if self.reason is not None or (self.parts is None and part > 0):
            return self.reason
        if self.parts is None or part == 0 and not self._read_head(fd):
            if self.reason is None:  # whole, as one read (a compressed payload decoded from a copy)
                self.reason = read_value_at(fd, self.offset, self.value_len, self.fingerprint, self.key, self.out,
                                            self.itemsize)
                self.parts = None
            return self.reason
        runs = self.parts[part]
        if part > 0:
            lo, hi = self._bounds[part], self._bounds[part + 1]
            if preadv(fd, runs, self.offset + HEADER_BYTES + lo) != hi - lo:
                self.reason = "short"
                return self.reason
        for run in runs:
            self._hash.update(run)
        if part == len(self.parts) - 1 and self._hash.intdigest() != self._checksum:
            self.reason = "corrupt"
        return self.reason

    def extent(self, part: int) -> tuple[int, int]:
        """(file offset, bytes) that `read(fd, part)` reads: the whole value with part 0 when it is read
        whole, else the part's byte range (part 0 with the header); (offset, 0) when a part reads nothing."""
        if self.parts is None:
            return (self.offset, self.value_len if part == 0 else 0)
        lo = 0 if part == 0 else HEADER_BYTES + self._bounds[part]
        return (self.offset + lo, HEADER_BYTES + self._bounds[part + 1] - lo)

    def _read_head(self, fd: Readable) -> bool:
        """Reads the header with part 0's bytes; False when the value is not raw after all (read it whole)."""
        head = _head()
        if preadv(fd, [head, *self.parts[0]], self.offset) != HEADER_BYTES + self._bounds[1]:
            self.reason = "short"
            return False
        try:
            header = decode_header(head)
        except CorruptBlockError:
            self.reason = "corrupt"
            return False
        if header.codec != Codec.NONE:
            return False
        self.reason = check_header(header, self.fingerprint, self.key, self.value_len, self._bounds[-1])
        self._checksum = header.checksum
        return self.reason is None


def part_bounds(spec: KVSpec, layer_groups: Sequence[tuple[int, int]] | None) -> list[int]:
    """The payload byte offsets of a block's `layer_groups` (0 first, the block's size last): the bounds of
    a `PartedValue`; [] for no groups or one (a whole-value read).

    Raises:
        ConfigError: the groups are not contiguous [lo, hi) ranges from 0 to num_layers.
    """
    if layer_groups is None or len(layer_groups) <= 1:
        return []
    groups, layers = [tuple(g) for g in layer_groups], spec.num_layers
    starts, stops = [lo for lo, _ in groups], [hi for _, hi in groups]
    if starts != [0, *stops[:-1]] or stops[-1] != layers or any(lo >= hi for lo, hi in groups):
        raise ConfigError(f"layer_groups: expected contiguous [lo, hi) ranges from 0 to {layers}, got {layer_groups!r}")
    per_layer = spec.bytes_per_block // layers
    return [lo * per_layer for lo in starts] + [spec.bytes_per_block]


def _split_runs(runs: Sequence[memoryview], bounds: Sequence[int]) -> list[list[memoryview]]:
    """Cuts memory runs (taken in order) at the byte offsets `bounds` (0 first, their total last)."""
    parts: list[list[memoryview]] = []
    it, pos, run = iter(runs), 0, memoryview(b"")
    for stop in bounds[1:]:
        part = []
        while pos < stop:
            if not len(run):
                run = next(it)
            take = min(len(run), stop - pos)
            part.append(run[:take])
            run, pos = run[take:], pos + take
        parts.append(part)
    return parts


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
