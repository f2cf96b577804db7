"""An engine's KV memory as transfers see it: the `KVBuffer` protocol and `BlockKVBuffer`.

- `KVBuffer`: what an engine adapter implements (`write_blocks`, `read_blocks`, optionally `write_chunks`);
- `BlockKVBuffer`: the simplest real one, whole blocks in the block layout (replay `--real`, benchmarks);
- `write_pieces(buffer, pieces, layers, copier)`: several runs of blocks into an engine's KV, as one batch
  of memory runs over a `ParallelCopier` where the buffer offers `write_chunks`;
- `slot_runs(...)`: groups slot lists into runs of consecutive slots (one copy per run); `runs_by_tier`
  the same per tier (a load's pieces).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from kvtier.tiers.copies import ParallelCopier, copy_tensor
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName


class KVBuffer(Protocol):
    """An engine's own KV memory as transfers see it; written by an engine adapter.

    What an engine block index means is the engine's business: for transformers, block i of the
    sequence (tokens [i*T, (i+1)*T)); for vLLM, a physical block id of its paged cache.
    Sources and destinations are typed tensors shaped `[n, hi - lo, kv_factor, num_kv_heads,
    block_tokens, head_dim]` (layers [lo, hi) of n blocks in the docs/design.md layout), usually a view
    of consecutive pool slots, so an adapter can move a run of blocks with one copy per layer.

    Optional: `write_chunks(dst_blocks, src, layers) -> list[(dst address, src address, bytes)] | None`,
    the memory runs a CPU `write_blocks` would copy (None when it is not a plain CPU copy), so a load
    spreads a layer group of every block over several threads (`write_pieces`).
    """

    spec: KVSpec

    def write_blocks(self, dst_blocks: Sequence[int], src: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of `len(dst_blocks)` blocks from `src` into the engine's blocks."""

    def read_blocks(self, src_blocks: Sequence[int], dst: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of the engine's blocks `src_blocks` into `dst`."""


class BlockKVBuffer:
    """An engine KV memory made of whole blocks in the docs/design.md layout: `[num_blocks, *spec.block_shape]`.

    The simplest real `KVBuffer`: replay's `--real` mode and the benchmarks use it as the engine's
    paged KV; an adapter for an engine with another layout implements the protocol itself.
    """

    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device | str = "cpu") -> None:
        if num_blocks <= 0:
            raise ConfigError(f"num_blocks: expected a positive int, got {num_blocks!r}")
        self.spec = spec
        self.data = torch.zeros((num_blocks, *spec.block_shape), dtype=spec.torch_dtype, device=device)

    def write_blocks(self, dst_blocks: Sequence[int], src: torch.Tensor, layers: tuple[int, int]) -> None:
        lo, hi = layers
        for first, b0, _, n in slot_runs(dst_blocks):
            copy_tensor(self.data[b0:b0 + n, lo:hi], src[first:first + n])

    def read_blocks(self, src_blocks: Sequence[int], dst: torch.Tensor, layers: tuple[int, int]) -> None:
        lo, hi = layers
        for first, b0, _, n in slot_runs(src_blocks):
            copy_tensor(dst[first:first + n], self.data[b0:b0 + n, lo:hi])


def write_pieces(buffer: KVBuffer, pieces: Sequence[tuple[Sequence[int], torch.Tensor]], layers: tuple[int, int],
                 copier: ParallelCopier) -> None:
    """Copies layers [lo, hi) of runs of blocks (engine block ids, source blocks) into the engine's KV.

    Where the buffer offers `write_chunks`, every run's pages go to `copier` as one batch: a copy into an
    engine's KV is memory bandwidth, and one thread copying a 2,048-token restore into vLLM's paged KV
    (94 MB, 480 pages) took 34 ms here against 22 ms for two (median of 21, load 5.6 on 2 vCPUs), time
    the first token waits for. Otherwise each run goes through `write_blocks`.
    """
    chunks_of = getattr(buffer, "write_chunks", None)
    chunks: list[tuple[int, int, int]] = []
    for dst_blocks, src in pieces:
        run = chunks_of(dst_blocks, src, layers) if chunks_of is not None else None
        if run is None:
            buffer.write_blocks(dst_blocks, src, layers)
        else:
            chunks.extend(run)
    if chunks:
        copier.copy(chunks)


def slot_runs(src_slots: Sequence[int], dst_slots: Sequence[int] | None = None) -> list[tuple[int, int, int, int]]:
    """Splits parallel slot lists into runs where both advance by one.

    Returns (index of the run's first entry, first src slot, first dst slot, count) per run; with no
    `dst_slots`, only the source must be consecutive (dst = the entry index).
    """
    runs: list[tuple[int, int, int, int]] = []
    dst = dst_slots if dst_slots is not None else range(len(src_slots))
    start = 0
    for i in range(1, len(src_slots) + 1):
        if i == len(src_slots) or src_slots[i] != src_slots[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            runs.append((start, src_slots[start], dst[start], i - start))
            start = i
    return runs


def runs_by_tier(tiers: Sequence[TierName], slots: Sequence[int]) -> list[tuple[TierName, int, int, int]]:
    """(tier, index of first entry, first slot, count) for runs of consecutive slots in one tier."""
    runs: list[tuple[TierName, int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or tiers[i] is not tiers[start] or slots[i] != slots[i - 1] + 1:
            runs.append((tiers[start], start, slots[start], i - start))
            start = i
    return runs
