"""Payload codecs of the disk tier: none, zstd, and zstd after a byte-plane shuffle.

Primitives:
- `Codec`: the codec ids stored in a value's header (NONE = 0, ZSTD = 1, ZSTD_SHUFFLE = 2).
- `PayloadCodec`: the small interface of a codec: `encode(data, itemsize) -> bytes` and
  `decode_into(src, out)`, which writes the raw payload straight into `out` (a writable buffer of the
  raw length, e.g. a host-pool slot), so a restore never builds an intermediate bytes object of the
  whole block where it can be avoided.
- `get_codec(codec, level)`: the registry from `Codec` to class.
- `shuffle_bytes(data, itemsize)` / `unshuffle_into(src, out, itemsize)`: the byte-plane transform.

Why shuffle: bf16/fp16 KV has a high byte (sign, exponent, top mantissa bits) that repeats a lot and a
low byte that is close to noise; putting all high bytes first and all low bytes after gives zstd long
runs of similar bytes. Only 2-byte elements are shuffled (other itemsizes pass through unchanged).

Invariants: `decode_into(encode(x), out)` leaves `out` byte-equal to `x`; `decode_into` raises
`CorruptBlockError` when the source does not decode to exactly `len(out)` bytes (never leaves a short
or long payload unnoticed). Codec objects are thread-safe: each call makes its own zstd context
(contexts are cheap next to an 8 MiB block) or uses a thread-local one.
"""

from __future__ import annotations

import enum
import threading
from typing import ClassVar

import numpy as np
import zstandard

from kvtier.tiers.errors import ConfigError, CorruptBlockError

Buffer = bytes | bytearray | memoryview


class Codec(enum.IntEnum):
    """Codec of a stored payload (its number is stored in the value header)."""

    NONE = 0
    ZSTD = 1
    ZSTD_SHUFFLE = 2

    @property
    def label(self) -> str:
        """The codec's name as the CLI writes it: "none", "zstd", "zstd-shuffle"."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, value: "Codec | str | int") -> "Codec":
        """A codec from its enum, name ("none", "zstd", "zstd-shuffle") or number.

        Raises:
            ConfigError: not a known codec.
        """
        if isinstance(value, Codec):
            return value
        if isinstance(value, str):
            name = value.strip().upper().replace("-", "_").replace("+", "_")
            if name in cls.__members__:
                return cls[name]
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        names = ", ".join(m.label for m in cls)
        raise ConfigError(f"codec: {value!r} is not a codec; expected one of {names}")


def _as_uint8(data: Buffer | np.ndarray) -> np.ndarray:
    """A flat uint8 numpy view of a bytes-like object (no copy)."""
    return np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)


def shuffle_bytes(data: Buffer | np.ndarray, itemsize: int) -> np.ndarray:
    """Byte planes of 2-byte elements: all high bytes, then all low bytes (a new array).

    Other itemsizes (or an odd length) come back as an unshuffled copy.
    """
    src = _as_uint8(data)
    if itemsize != 2 or src.size % 2:
        return src.copy()
    half = src.size // 2
    pairs = src.reshape(half, 2)
    out = np.empty_like(src)
    out[:half] = pairs[:, 1]  # little-endian: byte 1 is the high byte (sign, exponent)
    out[half:] = pairs[:, 0]
    return out


def unshuffle_into(src: Buffer | np.ndarray, out: Buffer | np.ndarray, itemsize: int) -> None:
    """Inverse of `shuffle_bytes`, written into `out` (same length as `src`)."""
    planes = _as_uint8(src)
    dst = _as_uint8(out)
    if planes.size != dst.size:
        raise CorruptBlockError(f"unshuffle: {planes.size} bytes decoded, expected {dst.size}")
    if itemsize != 2 or dst.size % 2:
        dst[:] = planes
        return
    half = dst.size // 2
    words = dst.view(np.uint16)
    # high plane shifted into place, then OR the low plane: two vectorised passes (~5.6 GB/s here,
    # against ~3.5 GB/s for two strided byte stores)
    np.left_shift(planes[:half], 8, out=words, dtype=np.uint16)
    np.bitwise_or(words, planes[half:], out=words, dtype=np.uint16)


class PayloadCodec:
    """How a block's payload is stored; subclasses are registered by their `codec` id."""

    codec: ClassVar[Codec]
    registry: ClassVar[dict[Codec, type["PayloadCodec"]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        PayloadCodec.registry[cls.codec] = cls

    def __init__(self, level: int = 1) -> None:
        if not isinstance(level, int) or not -7 <= level <= 22:
            raise ConfigError(f"zstd_level: expected an int in -7..22, got {level!r}")
        self.level = level

    @property
    def compresses(self) -> bool:
        """Whether stored bytes differ from raw bytes (False only for NONE)."""
        return True

    def encode(self, data: Buffer | np.ndarray, itemsize: int) -> bytes:
        """The stored form of a raw payload."""
        raise NotImplementedError

    def decode_into(self, src: Buffer, out: Buffer | np.ndarray, itemsize: int) -> None:
        """Writes the raw payload of stored bytes `src` into `out` (exactly `len(out)` bytes).

        Raises:
            CorruptBlockError: `src` does not decode to exactly `len(out)` bytes.
        """
        raise NotImplementedError


class NoneCodec(PayloadCodec):
    """Stores the raw bytes."""

    codec = Codec.NONE

    @property
    def compresses(self) -> bool:
        return False

    def encode(self, data: Buffer | np.ndarray, itemsize: int) -> bytes:
        return _as_uint8(data).tobytes()

    def decode_into(self, src: Buffer, out: Buffer | np.ndarray, itemsize: int) -> None:
        dst = _as_uint8(out)
        if len(src) != dst.size:
            raise CorruptBlockError(f"payload of {len(src)} bytes, expected {dst.size}")
        dst[:] = _as_uint8(src)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _zstd_decode_into(src: Buffer, out: memoryview) -> None:
    """Decompresses one zstd frame straight into `out`, checking the decoded length."""
    try:
        reader = _decompressor().stream_reader(src, read_across_frames=False)
        pos, size = 0, len(out)
        while pos < size:
            got = reader.readinto(out[pos:])
            if not got:
                break
            pos += got
        extra = reader.read(1)
    except zstandard.ZstdError as err:
        raise CorruptBlockError(f"zstd payload does not decode: {err}") from err
    if pos != size or extra:
        raise CorruptBlockError(f"zstd payload decodes to {pos if not extra else 'more than ' + str(size)} bytes, "
                                f"expected {size}")


class ZstdCodec(PayloadCodec):
    """zstd at `level` on the raw bytes."""

    codec = Codec.ZSTD

    def encode(self, data: Buffer | np.ndarray, itemsize: int) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(_as_uint8(data))

    def decode_into(self, src: Buffer, out: Buffer | np.ndarray, itemsize: int) -> None:
        _zstd_decode_into(src, memoryview(_as_uint8(out)))


class ZstdShuffleCodec(PayloadCodec):
    """zstd at `level` on the byte planes of 2-byte elements (bf16/fp16)."""

    codec = Codec.ZSTD_SHUFFLE

    def encode(self, data: Buffer | np.ndarray, itemsize: int) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(shuffle_bytes(data, itemsize))

    def decode_into(self, src: Buffer, out: Buffer | np.ndarray, itemsize: int) -> None:
        dst = _as_uint8(out)
        # the planes must land somewhere before they are interleaved: a reused per-thread buffer
        planes = getattr(_local, "planes", None)
        if planes is None or planes.size < dst.size:
            planes = _local.planes = np.empty(dst.size, dtype=np.uint8)
        planes = planes[:dst.size]
        _zstd_decode_into(src, memoryview(planes))
        unshuffle_into(planes, dst, itemsize)


def get_codec(codec: Codec | str | int, level: int = 1) -> PayloadCodec:
    """A codec object for a `Codec` (or its name or number).

    Raises:
        ConfigError: unknown codec or a bad level.
    """
    return PayloadCodec.registry[Codec.parse(codec)](level)
