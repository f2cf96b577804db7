"""GPU promotion on request: queued requests' host blocks copied into kvtier's own GPU pool while it has
free room (`OffloadConfig.prefetch_gpu`, off by default).

Prefetch targets the host tier (`admission`). An engine that gives kvtier a GPU pool of its own (the
`OffloadManager` path: `gpu_bytes` > 0; never under vLLM, whose paged KV is the GPU tier) may also ask
for host -> GPU promotions, so that a queued request's restore reads its blocks from GPU memory. Such a
promotion only fills slots that are free: it never evicts anything, and it never waits on the disk.

Primitives: `GpuPromotion(books, planner)`, `round(queue, out)` (one batched `Move` host -> gpu per
queued request, of its host blocks its plan restores, up to the free GPU slots), `used(key)` (a load
read a promoted block from the GPU), `left(key)` (a block left the GPU tier), and the counters in
`Stats` (`gpu_prefetched_blocks`, `gpu_prefetch_moves`, `gpu_prefetch_used_blocks`,
`gpu_prefetch_evicted_unused_blocks`).

Invariants: a block being promoted has a booked GPU slot (so no save takes it) and a pin (its host copy
stays where the move reads it); it is recorded in the GPU tier only once its bytes have landed, so a
load before then reads it from host; the request at the head of the queue with nothing running is about
to start and gets nothing (the copy would race its load); promoted blocks are ordinary GPU blocks once
landed (a later save may evict them; the host copy stays).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from kvtier.tiers.commands import Command, Completion, Move, MoveReason
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.tier import TierName


class GpuPromotion:
    """The host -> gpu promotions of one `Decider` (module docstring); the caller holds the decider's lock.

    Args:
        books: the decider (index, slot tables, queue, running requests, counters).
        planner: restricts promotions to the blocks a request's plan restores (None: every leading
            host block of its prefix).
    """

    def __init__(self, books: Any, planner: Any) -> None:
        self.books = books
        self.planner = planner
        self.unused: set[BlockKey] = set()
        self.moving: set[BlockKey] = set()
        books._drop_hooks[TierName.GPU] = self.left

    def round(self, queue: Sequence[Any], out: list[Command]) -> None:
        """Appends one batched host -> gpu `Move` per queued request in the window, while slots are free."""
        books = self.books
        gpu, host = TierName.GPU, TierName.HOST
        table = books.tables[gpu]
        free = table.num_free
        bt = books.spec.block_tokens
        for i, state in enumerate(itertools.islice(queue, books.config.prefetch_window)):
            if free <= 0:
                return
            if i == 0 and not books.running:
                continue  # about to start: its load would race the copy
            entries = books.index.lookup(state.keys[:state.num_tokens // bt])
            first, stop = 0, len(entries)
            if self.planner is not None and entries:
                plan = self.planner.plan([e.best_tier for e in entries], state.num_tokens)
                first, stop = plan.split, plan.restore_stop
            chosen = [e for e in entries[first:stop] if host in e.slots and gpu not in e.slots and not e.incoming
                      and e.key not in self.moving][:free]
            if chosen:
                free -= self._move(state.request_id, chosen, out)

    def _move(self, request_id: str, chosen: list[Any], out: list[Command]) -> int:
        books, gpu, host = self.books, TierName.GPU, TierName.HOST
        keys, src, dst = [], [], []
        for entry in chosen:
            slot = books._allocate(gpu, entry.key)
            if slot is None:  # no free slot after all: nothing is evicted for a promotion
                break
            keys.append(entry.key)
            src.append(entry.slots[host])
            dst.append(slot)
        if not keys:
            return 0
        books.index.pin(keys)  # the host copy stays in its slot until the move has read it
        self.moving.update(keys)
        move = Move(host, gpu, tuple(keys), tuple(src), tuple(dst), request_id, MoveReason.PREFETCH)
        books._track(move, lambda c, s=dict(zip(keys, dst)): self._landed(c, s))
        out.append(move)
        books.stats.gpu_prefetch_moves += 1
        return len(keys)

    def _landed(self, completion: Completion, slots: dict[BlockKey, int]) -> list[Command]:
        books, gpu = self.books, TierName.GPU
        ok = set(completion.ok) - set(completion.failed)
        for key, slot in slots.items():
            self.moving.discard(key)
            entry = books.index.get(key)
            if key in ok and entry is not None and entry.slots and gpu not in entry.slots:
                books._add(key, gpu, slot, entry.depth, entry.parent)
                books.stats.gpu_prefetched_blocks += 1
                self.unused.add(key)
            elif books.tables[gpu].slot_of(key) == slot and not books.index.holds(key, gpu):
                books.tables[gpu].free(key)
        books.index.unpin(tuple(slots))
        return []

    def used(self, key: BlockKey) -> None:
        """A load read this block from the GPU tier."""
        if key in self.unused:
            self.unused.discard(key)
            self.books.stats.gpu_prefetch_used_blocks += 1

    def left(self, key: BlockKey) -> None:
        """A block left the GPU tier (a save's eviction, a failure)."""
        if key in self.unused:
            self.unused.discard(key)
            self.books.stats.gpu_prefetch_evicted_unused_blocks += 1
