"""The on-disk value format of the disk tier: a fixed 64-byte header, then the payload.

Primitives:
- `HEADER_BYTES` (64), `MAGIC` (b"KVTB"), `VALUE_FORMAT_VERSION`, `STORE_FORMAT_VERSION`.
- `BlockHeader`: the decoded header (frozen dataclass); `encode_header(...)` -> 64 bytes.
- `decode_header(buf)` -> BlockHeader (raises `CorruptBlockError` on a malformed header).
- `check_header(header, fingerprint, key, value_len)` -> None when the header is what was asked
  for, else the reason: `"corrupt"` (bad magic, version, lengths) or `"foreign"` (a well-formed header
  of another model or another key).
- `checksum(buf)`: xxh3-64 of a bytes-like object (the stored, possibly compressed, payload).
- `lmdb_key(fingerprint, key)`: the 32-byte LMDB key (fingerprint + block key), so a prefix scan
  lists one model's blocks.

Header layout (little-endian, 64 bytes):

| offset | size | field |
|---|---|---|
| 0 | 4 | magic b"KVTB" |
| 4 | 2 | value format version (u16) |
| 6 | 1 | codec (u8, `Codec`) |
| 7 | 1 | flags (u8, 0 for now) |
| 8 | 16 | spec fingerprint (raw bytes) |
| 24 | 16 | block key |
| 40 | 8 | stored payload length (u64) |
| 48 | 8 | raw payload length (u64) |
| 56 | 8 | xxh3-64 of the stored payload (u64) |

Invariants: a value is exactly `HEADER_BYTES + stored_len` bytes; the checksum covers the stored bytes,
so it is checked before any decompression.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from kvtier.tiers.codecs import Codec, PayloadCodec

from kvtier.tiers.errors import ConfigError, CorruptBlockError

MAGIC = b"KVTB"
HEADER_BYTES = 64
#: where a raw value's payload starts within a page of data.mdb: LMDB stores a value larger than a page (every
#: block's) from 16 bytes into its first page (after its page header), and the payload follows our header. A
#: host slot placed at the same place in its page takes an uncached read of the value straight from the disk
PAYLOAD_IN_PAGE = 16 + HEADER_BYTES
#: version of one value's header (bumped when the header layout changes)
VALUE_FORMAT_VERSION = 1
#: version of the store as a whole (sub-database names, key layout, meta records); kept in the meta db
STORE_FORMAT_VERSION = 1

_HEADER = struct.Struct("<4sHBB16s16sQQQ")
assert _HEADER.size == HEADER_BYTES, "the header must stay 64 bytes"

FINGERPRINT_BYTES = 16
KEY_BYTES = 16

checksum = xxhash.xxh3_64_intdigest


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The decoded 64-byte header of one stored block."""

    version: int
    codec: int
    flags: int
    fingerprint: bytes
    key: bytes
    stored_len: int
    raw_len: int
    checksum: int


def encode_header(fingerprint: bytes, key: bytes, codec: int, stored_len: int, raw_len: int, digest: int,
                  flags: int = 0) -> bytes:
    """The 64-byte header of a value (see the module docstring for the layout)."""
    return _HEADER.pack(MAGIC, VALUE_FORMAT_VERSION, int(codec), flags, fingerprint, key, stored_len, raw_len, digest)


def pack_header_into(buf: bytearray | memoryview, fingerprint: bytes, key: bytes, codec: int, stored_len: int,
                     raw_len: int, digest: int, flags: int = 0) -> None:
    """Writes the header into the first 64 bytes of `buf` (no allocation)."""
    _HEADER.pack_into(buf, 0, MAGIC, VALUE_FORMAT_VERSION, int(codec), flags, fingerprint, key, stored_len, raw_len,
                      digest)


def decode_header(buf: bytes | bytearray | memoryview) -> BlockHeader:
    """Decodes the first 64 bytes of `buf`.

    Raises:
        CorruptBlockError: fewer than 64 bytes, or the magic is not b"KVTB".
    """
    if len(buf) < HEADER_BYTES:
        raise CorruptBlockError(f"value of {len(buf)} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, codec, flags, fp, key, stored_len, raw_len, digest = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptBlockError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    return BlockHeader(version, codec, flags, bytes(fp), bytes(key), stored_len, raw_len, digest)


def check_header(header: BlockHeader, fingerprint: bytes, key: bytes, value_len: int, raw_len: int) -> str | None:
    """Whether a decoded header is the one asked for.

    Args:
        header: the decoded header.
        fingerprint: the spec's 16-byte fingerprint the reader expects.
        key: the block key the reader expects.
        value_len: the length of the whole LMDB value.
        raw_len: the block size the reader expects (spec.bytes_per_block).

    Returns:
        None when it matches; "corrupt" when the version, lengths or codec are impossible; "foreign"
        when it is a well-formed header of another model or another block.
    """
    if header.version != VALUE_FORMAT_VERSION or header.flags != 0:
        return "corrupt"
    if header.stored_len + HEADER_BYTES != value_len:
        return "corrupt"
    if header.fingerprint != fingerprint or header.key != key:
        return "foreign"
    if header.raw_len != raw_len:
        return "corrupt"
    return None


def lmdb_key(fingerprint: bytes, key: bytes) -> bytes:
    """The LMDB key of a block: the spec's fingerprint (16 bytes) then the block key (16 bytes)."""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"block key: expected {KEY_BYTES} bytes, got {len(key)} ({bytes(key)[:20]!r})")
    return fingerprint + key


def encode_value(codec: PayloadCodec, fingerprint: bytes, key: bytes, flat: np.ndarray, itemsize: int) -> memoryview | bytearray:
    """The stored value of one block: header then payload (raw payloads in a reused per-thread buffer)."""
    from kvtier.tiers.disk.read import scratch

    raw_len = flat.size
    if not codec.compresses:
        value = scratch(HEADER_BYTES + raw_len)
        value[HEADER_BYTES:] = flat.data
        pack_header_into(value, fingerprint, key, Codec.NONE, raw_len, raw_len, checksum(flat))
        return value
    payload = codec.encode(flat, itemsize)
    value = bytearray(HEADER_BYTES + len(payload))
    value[HEADER_BYTES:] = payload
    pack_header_into(value, fingerprint, key, codec.codec, len(payload), raw_len, checksum(payload))
    return value
