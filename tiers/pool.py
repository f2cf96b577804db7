"""Slot pools: the `gpu` and `host` tiers, each one preallocated tensor cut into block slots.

Primitives:
- `SlotPool`: `num_slots` blocks in one uint8 tensor `[num_slots, bytes_per_block]`, allocated once
  (pinned host memory when CUDA is present; else CPU memory on transparent huge pages, starting
  `page_offset` bytes into a page);
  `block(slot)`, `blocks(first, count)` (a typed view of consecutive slots shaped
  `[count, num_layers, kv_factor, num_kv_heads, block_tokens, head_dim]`).
- `PoolTier`: a `Tier` over a `SlotPool` and a `SlotTable` (key -> slot).
- `GpuTier`: the pool on the CUDA device; on CPU memory when there is no CUDA (same code).
- `HostTier`: the pool in host memory, pinned when CUDA is present; its slots start where a value's payload
  does in its page of the disk tier's file, so an uncached disk read lands in them without a copy
  (`disk.uncached`).

Invariants: memory is allocated once at construction, never per block; a slot's bytes are this
process's own memory guarded by the index, so reads are not checksummed (docs/design.md).
"""

from __future__ import annotations

import mmap
import threading
from typing import Any

import torch

from kvtier.tiers.disk.format import PAYLOAD_IN_PAGE
from kvtier.tiers.disk.uncached import ALIGN, huge_page_mapping
from kvtier.tiers.errors import CapacityError, ConfigError, SpecMismatchError
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.slots import SlotTable
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import Tier, TierName, format_size


def cuda_available() -> bool:
    """Whether a CUDA device is usable."""
    return torch.cuda.is_available()


def default_device(name: TierName) -> torch.device:
    """Where a tier's pool lives: the GPU tier on CUDA when present, otherwise CPU memory."""
    if name is TierName.GPU and cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SlotPool:
    """One preallocated uint8 tensor cut into block slots."""

    def __init__(self, spec: KVSpec, num_slots: int, device: torch.device | str = "cpu", pin: bool = False,
                 page_offset: int = 0) -> None:
        """`page_offset`: where in its page (of `disk.uncached.ALIGN` bytes) the pool's memory starts (CPU
        memory only; with blocks a whole number of pages long, every slot starts there)."""
        if num_slots <= 0:
            raise ConfigError(f"num_slots: expected a positive int, got {num_slots!r}")
        self.spec = spec
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.pinned = bool(pin and self.device.type == "cpu" and cuda_available())
        try:
            # CPU memory on transparent huge pages: a disk read straight into a slot (`disk.uncached`) is then
            # one piece of physical memory per 2 MiB, so a 3 MB read reaches the disk as one request, where
            # 4 KiB pages cut it into requests of 744 KB (186 pieces each). On this project's VM (virtio disk)
            # 31 cold reads of 2.9 MB into 4 KiB pages took 109 ms (median of 7, other core busy), into huge
            # pages 53-57 ms, against 68 ms for a cold buffered read of the same bytes (docs/disk-reads.md)
            size = num_slots * spec.bytes_per_block
            if self.device.type == "cpu":
                # room to place the pool, unless pinned memory would cross a power of two for it (CUDA's host
                # allocator rounds a request up to one: a 1 GiB pool would take 2 GiB)
                slack = ALIGN if not self.pinned or (size + ALIGN - 1).bit_length() == (size - 1).bit_length() else 0
                whole = torch.empty(size + slack, dtype=torch.uint8, pin_memory=True) if self.pinned else \
                    huge_page_memory(size + slack)
                start = (page_offset - whole.data_ptr()) % ALIGN if slack else 0
                self.data = whole[start:start + size].view(num_slots, spec.bytes_per_block)
                # fault every page in now, in order (the kernel can back it with huge pages), rather than
                # on the first copy into each slot: first-touch faults in slot order cost ~3x a copy
                self.data.zero_()
            else:
                self.data = torch.empty((num_slots, spec.bytes_per_block), dtype=torch.uint8, device=self.device)
        except (RuntimeError, OSError) as err:
            raise ConfigError(f"cannot allocate {format_size(size)} for "
                              f"{num_slots} slots on {self.device}: {err}") from err

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool."""
        return self.data.numel()

    def block(self, slot: int) -> torch.Tensor:
        """The uint8 bytes of one slot (a view)."""
        return self.data[slot]

    def blocks(self, first: int, count: int) -> torch.Tensor:
        """Typed view of `count` consecutive slots: `[count, *spec.block_shape]` in the spec's dtype."""
        return self.data[first:first + count].view(self.spec.torch_dtype).view(count, *self.spec.block_shape)


def huge_page_memory(size: int) -> torch.Tensor:
    """`size` bytes of CPU memory (uint8) starting on a huge page boundary, backed by transparent huge
    pages where the kernel offers them (`disk.uncached.huge_page_mapping`; plain pages elsewhere, or with
    `KVTIER_HUGE_PAGES=0` in the environment). The tensor keeps its mapping alive."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # not a POSIX system
        return torch.empty(size, dtype=torch.uint8)
    region, start = huge_page_mapping(size)
    return torch.frombuffer(region, dtype=torch.uint8)[start:start + size]


class PoolTier(Tier):
    """A tier of whole blocks in a `SlotPool`, addressed by key through a `SlotTable`."""

    #: where in its page the pool's memory starts (`SlotPool`)
    page_offset = 0

    def __init__(self, spec: KVSpec, capacity_bytes: int | str, *, device: torch.device | str | None = None,
                 pin: bool | None = None) -> None:
        super().__init__(spec, capacity_bytes)
        device = torch.device(device) if device is not None else default_device(self.name)
        self.pool = SlotPool(spec, self.num_slots, device, pin=cuda_available() if pin is None else pin,
                             page_offset=self.page_offset)
        self.table = SlotTable(self.num_slots)
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def num_used(self) -> int:
        return len(self.table)

    def contains(self, key: BlockKey) -> bool:
        return key in self.table

    def slot_of(self, key: BlockKey) -> int | None:
        """The key's slot, or None."""
        return self.table.slot_of(key)

    def put(self, key: BlockKey, block: torch.Tensor) -> None:
        flat = self.check_block(block)
        with self._lock:
            slot = self.table.allocate(key)
        if slot is None:
            raise CapacityError(f"{self.name} tier is full ({self.num_slots} blocks)")
        dst = self.pool.block(slot)
        # a blocking copy: a non-blocking one into pinned host memory returned before the bytes had landed
        # (a `get` or a disk write right after read stale bytes), and one from a pinned block let the caller
        # reuse its block while the copy still read it
        dst.copy_(flat)
        if dst.device.type == "cuda" or flat.device.type == "cuda":
            # device-side copies are queued on the caller's stream even when "blocking": wait, so that a
            # transfer on kvtier's own stream never reads the slot before it is written
            torch.cuda.current_stream(dst.device if dst.device.type == "cuda" else flat.device).synchronize()

    def get(self, key: BlockKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        slot = self.table.slot_of(key)
        if slot is None:
            return None
        src = self.pool.block(slot)
        if out is None:
            return src.clone()
        self.check_block(out, "out").copy_(src)
        return out

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            return self.table.free(key) is not None

    def keys(self) -> list[BlockKey]:
        return self.table.keys()  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """Capacity and placement, for reports."""
        return {"tier": str(self.name), "device": str(self.device), "pinned": self.pool.pinned,
                "num_slots": self.num_slots, "capacity_bytes": self.capacity_bytes}

    def close(self) -> None:
        super().close()


class GpuTier(PoolTier):
    """The `gpu` tier: a slot pool on the CUDA device, or in CPU memory without CUDA."""

    name = TierName.GPU


class HostTier(PoolTier):
    """The `host` tier: a slot pool in host memory, pinned when CUDA is present."""

    name = TierName.HOST
    page_offset = PAYLOAD_IN_PAGE


def check_same_spec(a: KVSpec, b: KVSpec, what: str) -> None:
    """Raises SpecMismatchError when two tiers of one transfer hold different specs."""
    if a.fingerprint != b.fingerprint:
        raise SpecMismatchError(f"{what}: tiers hold different KV specs ({a.model_id} {a.fingerprint[:8]} vs "
                                f"{b.model_id} {b.fingerprint[:8]})")
