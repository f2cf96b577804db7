"""The interface every tier offers, and the tier names.

Primitives:
- `TierName`: `gpu`, `host`, `disk`, `remote` (ordered fastest first).
- `Tier`: a store of whole-block payloads with a byte capacity: `put` / `get` / `contains` / `delete`,
  their batched forms (`put_many`, `get_many`, which loop over the single-key form unless a tier can do
  better) and asynchronous forms (`put_async`, `get_async`, returning a `TransferHandle`).
- `OUTSIDE` (disk, remote: tiers read and written by key, outside this process's memory) and
  `get_outside(...)`: one batched `get_many` per such tier for a mix of their blocks.

Invariants:
- a block's payload is one contiguous uint8 buffer of `spec.bytes_per_block` bytes in the layer-major
  layout (docs/design.md "Block layout");
- `get` returns None on a miss (a corrupt or foreign block is a miss too, never data);
- `capacity_bytes` is never exceeded: a `put` into a full tier raises `CapacityError` (the scheduler's
  policies choose victims before putting).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from kvtier.tiers.errors import ConfigError, SpecMismatchError
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.worker import PRIORITY_LOAD, PRIORITY_SAVE, TransferHandle, Worker

if TYPE_CHECKING:
    import torch


class TierName(str, enum.Enum):
    """Names of the tiers, fastest first."""

    GPU = "gpu"
    HOST = "host"
    DISK = "disk"
    #: a store shared by serving replicas (Redis / Valkey), below the disk
    REMOTE = "remote"

    @property
    def rank(self) -> int:
        """0 for gpu, 1 for host, 2 for disk, 3 for remote."""
        return _RANK[self]

    def __str__(self) -> str:
        return self.value


#: the members as plain names: CPython 3.11 loads a member off an Enum class ~5x slower than a
#: module global, which the decision half's per-block paths feel
GPU, HOST, DISK, REMOTE = TierName
_RANK = {GPU: 0, HOST: 1, DISK: 2, REMOTE: 3}
#: tiers outside this process's memory: read and written by key, on background workers
OUTSIDE = (TierName.DISK, TierName.REMOTE)


def parse_size(value: int | str, what: str = "size") -> int:
    """Parses a byte size: an int, or a string such as "64GiB", "512MiB", "2TB", "1.5G".

    Raises:
        ConfigError: the value is not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{what}: expected a non-negative size, got {value}")
        return value
    text = str(value).strip().replace("_", "")
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
             "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
    i = len(text)
    while i and text[i - 1].isalpha():
        i -= 1
    number, unit = text[:i].strip(), text[i:].strip().lower()
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"{what}: {value!r} is not a size; expected e.g. 4096, '512MiB', '64GiB', '2TB'") from None
    if size < 0:
        raise ConfigError(f"{what}: expected a non-negative size, got {value!r}")
    return int(size)


def format_size(num_bytes: float) -> str:
    """A byte count in binary units, e.g. '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


class Tier(ABC):
    """A store of whole blocks of one KVSpec with a byte capacity."""

    name: TierName
    spec: KVSpec

    def __init__(self, spec: KVSpec, capacity_bytes: int | str) -> None:
        capacity = parse_size(capacity_bytes, f"{self.name} capacity")
        if capacity < spec.bytes_per_block:
            raise ConfigError(
                f"{self.name} capacity: {format_size(capacity)} is smaller than one block "
                f"({format_size(spec.bytes_per_block)} = {spec.block_tokens} tokens x {spec.bytes_per_token} B)")
        self.spec = spec
        self.capacity_bytes = capacity

    @property
    def num_slots(self) -> int:
        """Capacity in blocks."""
        return self.capacity_bytes // self.spec.bytes_per_block

    @property
    @abstractmethod
    def num_used(self) -> int:
        """Blocks stored now."""

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks stored now (payload size, before compression)."""
        return self.num_used * self.spec.bytes_per_block

    @abstractmethod
    def contains(self, key: BlockKey) -> bool:
        """Whether the tier holds the block."""

    @abstractmethod
    def put(self, key: BlockKey, block: "torch.Tensor") -> None:
        """Stores a copy of one block (overwriting the key if present).

        Raises:
            CapacityError: the tier is full.
            SpecMismatchError: the block has the wrong size.
        """

    @abstractmethod
    def get(self, key: BlockKey, out: "torch.Tensor | None" = None) -> "torch.Tensor | None":
        """Copies one block into `out` (or a new tensor) and returns it; None on a miss."""

    @abstractmethod
    def delete(self, key: BlockKey) -> bool:
        """Removes a block; False if it was not there."""

    def keys(self) -> list[BlockKey]:
        """Keys of every block stored now (of this tier's spec)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its keys")

    def put_many(self, keys: Sequence[BlockKey], blocks: Sequence["torch.Tensor"]) -> None:
        """Stores many blocks (loops over `put` unless the tier can batch)."""
        if len(keys) != len(blocks):
            raise ConfigError(f"put_many: {len(keys)} keys but {len(blocks)} blocks")
        for key, block in zip(keys, blocks):
            self.put(key, block)

    def get_many(self, keys: Sequence[BlockKey], outs: Sequence["torch.Tensor"]) -> list[bool]:
        """Copies many blocks into `outs`; returns which were found (loops over `get` unless batched)."""
        if len(keys) != len(outs):
            raise ConfigError(f"get_many: {len(keys)} keys but {len(outs)} outputs")
        return [self.get(key, out) is not None for key, out in zip(keys, outs)]

    def put_async(self, keys: Sequence[BlockKey], blocks: Sequence["torch.Tensor"]) -> TransferHandle:
        """Starts `put_many` in the background; the handle completes when the blocks are stored."""
        return self._background().submit(lambda: self.put_many(keys, blocks), TransferHandle(keys), PRIORITY_SAVE)

    def get_async(self, keys: Sequence[BlockKey], outs: Sequence["torch.Tensor"]) -> TransferHandle:
        """Starts `get_many` in the background; the handle's `failed` lists the keys that missed."""

        def work() -> list[BlockKey]:
            return [k for k, ok in zip(keys, self.get_many(keys, outs)) if not ok]

        return self._background().submit(work, TransferHandle(keys), PRIORITY_LOAD)

    def _background(self) -> Worker:
        """This tier's background thread, started on first use and joined by `close()`."""
        worker = getattr(self, "_worker", None)
        if worker is None:
            worker = self._worker = Worker(f"kvtier-{self.name}")
        return worker

    def check_block(self, block: "torch.Tensor", what: str = "block") -> "torch.Tensor":
        """Returns `block` as a flat uint8 view, checking that it has exactly one block's bytes.

        Raises:
            SpecMismatchError: the tensor's byte size is not `spec.bytes_per_block`, or it is not contiguous.
        """
        if not block.is_contiguous():
            raise SpecMismatchError(f"{what}: expected a contiguous tensor")
        flat = block.reshape(-1).view(_uint8())
        if flat.numel() != self.spec.bytes_per_block:
            raise SpecMismatchError(
                f"{what}: expected {self.spec.bytes_per_block} bytes (one block of {self.spec.model_id}: shape "
                f"{self.spec.block_shape} {self.spec.dtype}), got {flat.numel()} bytes "
                f"(shape {tuple(block.shape)} {block.dtype})")
        return flat

    def close(self) -> None:
        """Finishes queued background work and releases the tier's resources (idempotent)."""
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()

    def __enter__(self) -> "Tier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _uint8():
    import torch

    return torch.uint8


def get_outside(by_name: Mapping[TierName, Tier], tiers: Sequence[TierName], keys: Sequence[BlockKey],
                outs: Sequence[object], on_landed: Callable[[list[int]], None] | None,
                batch_blocks: int) -> list[bool]:
    """`get_many` of blocks held outside this process (block i in tier `tiers[i]`: disk or remote), disk
    blocks first, then remote ones, each tier's in one batched call; `on_landed` gets indices into `keys`.

    Returns:
        which blocks were delivered.
    """
    found = [False] * len(keys)
    for tier in OUTSIDE:
        idx = [j for j, t in enumerate(tiers) if t is tier]
        if not idx:
            continue
        landed = None if on_landed is None else (lambda b, idx=idx: on_landed([idx[j] for j in b]))
        got = by_name[tier].get_many([keys[j] for j in idx], [outs[j] for j in idx], landed, batch_blocks)
        for j, ok in zip(idx, got):
            found[j] = ok
    return found
