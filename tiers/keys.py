"""Block keys: chained prefix hashes, rooted in a model's namespace.

Primitives:
- `BlockKey`: a 16-byte key (a `NewType` over bytes, so raw bytes are not mixed up with keys).
- `namespace(fingerprint, salt)`, `root_key(namespace)`: the chain's root for one model (and tenant).
- `chain_keys(token_ids, block_tokens, namespace)`: the keys of every full block of a token sequence.
- `KeyChain`: the same, bound to a spec and salt, with the root computed once.

Invariants (docs/design.md "Specifications", checked by test vectors):
- namespace = fingerprint (16 raw bytes) + b"\\0" + salt; root = blake2b-16(namespace);
- key(i) = blake2b-16(key(i-1) + block i's token ids as little-endian int32);
- equal keys mean an equal prefix (and an equal model and salt), so a lookup walks keys until the
  first miss. Keys depend only on their inputs, never on `hash()` or the process.

Speed: the chain runs in one C loop (`kvtier.tiers._chainhash`, an optional extension built at install)
when it is present, else in a Python loop; both give the same keys (the tests check each against the
vectors). `HASH_BACKEND` says which one this process uses. 128k tokens at 64-token blocks (2,048
blake2b calls): ~1.0 ms of CPU in C against ~1.8 ms in Python here; the Python loop's time was mostly
interpreter work per block (a slice, a concatenation, a hasher object, a digest).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any, NewType, Sequence

import numpy as np

from kvtier.tiers.errors import ConfigError

try:
    from ._chainhash import chain as _c_chain
except ImportError:  # built without a C compiler: the Python loop below gives the same keys
    _c_chain = None

BlockKey = NewType("BlockKey", bytes)

KEY_BYTES = 16

#: which implementation `chain_keys` uses in this process: "c" or "python"
HASH_BACKEND = "c" if _c_chain is not None else "python"


def namespace(fingerprint: bytes | str, salt: bytes | str = b"") -> bytes:
    """The namespace of a model (its fingerprint) and an optional tenant salt."""
    fp = bytes.fromhex(fingerprint) if isinstance(fingerprint, str) else bytes(fingerprint)
    if len(fp) != KEY_BYTES:
        raise ConfigError(f"fingerprint: expected 16 bytes (32 hex digits), got {len(fp)} bytes")
    return fp + b"\0" + (salt.encode() if isinstance(salt, str) else bytes(salt))


def root_key(ns: bytes) -> BlockKey:
    """The key a chain starts from: blake2b-16 of the namespace."""
    return BlockKey(blake2b(ns, digest_size=KEY_BYTES).digest())


def as_int32_le(token_ids: Any) -> np.ndarray:
    """Token ids as a contiguous little-endian int32 numpy array (no copy when already one).

    Accepts a numpy array, a torch tensor (CPU or not) or a sequence of ints.
    """
    if isinstance(token_ids, np.ndarray):
        arr = token_ids
    elif hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):  # a torch tensor; no torch import here
        arr = token_ids.detach().cpu().numpy()
    else:
        arr = np.asarray(token_ids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise ConfigError(f"token_ids: expected integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype="<i4")


def chain_keys(token_ids: Any, block_tokens: int, ns: bytes, *, parent: bytes | None = None,
               max_blocks: int | None = None) -> list[BlockKey]:
    """Keys of the full blocks of `token_ids` (a trailing partial block gets no key).

    Args:
        token_ids: the prompt's token ids (numpy array or torch tensor preferred: a Python list of 128k
            ints alone costs ~4 ms to convert).
        block_tokens: tokens per block.
        ns: the namespace (`namespace(...)`).
        parent: the key of the block before `token_ids[0]` when hashing a continuation; the root when None.
        max_blocks: stop after this many blocks.
    """
    if block_tokens <= 0:
        raise ConfigError(f"block_tokens: expected a positive int, got {block_tokens!r}")
    arr = as_int32_le(token_ids)
    num = arr.size // block_tokens
    if max_blocks is not None:
        num = max(0, min(num, max_blocks))
    key = parent if parent is not None else blake2b(ns, digest_size=KEY_BYTES).digest()
    if _c_chain is not None:
        return _c_chain(arr, block_tokens * 4, key, num)
    return python_chain(arr.tobytes(), block_tokens * 4, key, num)


def python_chain(data: bytes, step: int, key: bytes, num: int) -> list[BlockKey]:
    """`chain_keys`' loop in Python: the fallback where the C extension was not built, and the reference
    the C loop is tested against."""
    keys: list[BlockKey] = []
    append = keys.append
    # one blake2b call on (previous key + block bytes) per block: the fastest Python form measured here
    for block in [data[i * step:(i + 1) * step] for i in range(num)]:
        key = blake2b(key + block, digest_size=KEY_BYTES).digest()
        append(key)  # type: ignore[arg-type]
    return keys


class KeyChain:
    """Computes block keys for one spec (fingerprint and block size) and one salt."""

    __slots__ = ("block_tokens", "namespace", "root")

    def __init__(self, fingerprint: bytes | str, block_tokens: int, salt: bytes | str = b"") -> None:
        if block_tokens <= 0:
            raise ConfigError(f"block_tokens: expected a positive int, got {block_tokens!r}")
        self.block_tokens = block_tokens
        self.namespace = namespace(fingerprint, salt)
        self.root = root_key(self.namespace)

    @classmethod
    def for_spec(cls, spec: Any, salt: bytes | str = b"") -> "KeyChain":
        """The chain of a `KVSpec` (its fingerprint and block size)."""
        return cls(spec.fingerprint_bytes, spec.block_tokens, salt)

    def keys(self, token_ids: Any, max_blocks: int | None = None) -> list[BlockKey]:
        """Keys of the full blocks of `token_ids`."""
        return chain_keys(token_ids, self.block_tokens, self.namespace, parent=self.root, max_blocks=max_blocks)

    def extend(self, parent: BlockKey | None, token_ids: Any) -> list[BlockKey]:
        """Keys of the full blocks of `token_ids` continuing after the block whose key is `parent`."""
        return chain_keys(token_ids, self.block_tokens, self.namespace, parent=parent or self.root)


def trace_key(hash_id: int) -> BlockKey:
    """A trace's block id (already chained, as Mooncake `hash_ids`) as a 16-byte key."""
    return BlockKey(int(hash_id).to_bytes(KEY_BYTES, "little", signed=True))


def short(key: bytes | Sequence[int]) -> str:
    """The first 8 hex digits of a key, for logs and explanations."""
    return bytes(key).hex()[:8]
