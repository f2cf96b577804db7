"""Books: the decision half's record of where every block lives, and the eviction cascade.

Primitives (the caller holds `lock`):
- `Books(spec, config)`: the `Index`, one `SlotTable` per memory tier, one policy per tier, the commands
  in flight (`pending`) and the counters (`Stats`);
- `_add` / `_drop` a tier copy (index, policy and slot table together); `_allocate` a slot;
- `_make_room(tier, num, out, request_id)`: frees slots by demoting or dropping victims, appending the
  commands to `out`; `_forget(key)` drops every copy of a block whose bytes failed;
- `_track(command, on_done)`: what to do when the command's completion comes back;
- `probe_remote(keys)` (takes the lock itself; the probe runs without it): books the remote blocks of a
  prefix as the remote answers now (`remote_probe`), unbooks those it no longer holds.

Invariants:
- pinned blocks (pins > 0) are never victims, in any tier; blocks that queued requests protect (their
  prefetched or host-resident prefix, see `admission`) are never victims in the prefetch target tier;
  a tier whose blocks are all pinned or protected frees nothing (a save then saves a shorter prefix);
- every slot freed here may be reused by the next command at once: the byte half runs pool copies in
  submission order, so a demotion out of a slot reads it before a later command fills it;
- `_drop` of a block some queued request protects releases that protection (its room is free again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kvtier.tiers.commands import Command, Completion, Evict, Move, MoveReason
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.slots import SlotTable
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import DISK, GPU, HOST, REMOTE, TierName

from kvtier.scheduler.config import OffloadConfig, WriteMode
from kvtier.scheduler.index import DISK_SLOT, Index
from kvtier.scheduler.policies import AutoPolicy, make_policy

log = logging.getLogger(__name__)
_DEMOTE = MoveReason.DEMOTE  # a global: see `kvtier.tiers.tier.GPU`


@dataclass(slots=True)
class Stats:
    """Counters of the decision half (see `OffloadManager.stats`).

    The prefetch counters: `prefetch_ready_blocks` restored blocks a load found in memory (not on
    disk, or joined on their way to host); `prefetched_blocks` promotions that landed; `prefetch_used_blocks` of those,
    read by a load (or joined by one while in flight) before leaving the target tier;
    `prefetch_evicted_unused_blocks` left it unread; `prefetch_cancelled_blocks` promotions cancelled
    before their read began; `prefetch_joined_blocks` blocks a load took from a promotion in flight
    instead of reading the disk again; `double_reads` blocks a load read from disk while a promotion of
    the same block was in flight (0 by design: the load joins it); `prefetch_yielded_blocks` protections
    released because a running request's load needed the host room; `promotion_latency_s` the sum of
    issue-to-landing times; `disk_load_s` / `disk_prefetch_s` predicted disk-read seconds of loads and
    of promotions. `gpu_prefetch_*`: the host -> gpu promotions an engine asked for
    (`OffloadConfig.prefetch_gpu`, see `gpu_promotion`): blocks landed, moves, read by a load from the
    GPU, evicted from it unread.
    """

    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0
    hit_blocks_by_tier: dict[str, int] = field(default_factory=dict)
    restored_blocks: int = 0
    recomputed_cached_blocks: int = 0
    prefetched_blocks: int = 0
    prefetch_ready_blocks: int = 0
    prefetch_used_blocks: int = 0
    prefetch_evicted_unused_blocks: int = 0
    prefetch_cancelled_blocks: int = 0
    prefetch_joined_blocks: int = 0
    prefetch_moves: int = 0
    prefetch_yielded_blocks: int = 0
    gpu_prefetched_blocks: int = 0
    gpu_prefetch_moves: int = 0
    gpu_prefetch_used_blocks: int = 0
    gpu_prefetch_evicted_unused_blocks: int = 0
    double_reads: int = 0
    promotion_latency_s: float = 0.0
    disk_load_s: float = 0.0
    disk_prefetch_s: float = 0.0
    saved_blocks: int = 0
    saves_skipped_no_room: int = 0
    demoted_blocks: int = 0
    dropped_blocks: int = 0
    failed_blocks: int = 0
    written_to_disk_blocks: int = 0
    written_to_remote_blocks: int = 0
    remote_probes: int = 0


@dataclass(slots=True)
class _Pending:
    command: Command
    on_done: Callable[[Completion], list[Command]] | None = None


class Books:
    """Index, slot tables, policies and the eviction cascade of one decision half."""

    def __init__(self, spec: KVSpec, config: OffloadConfig) -> None:
        self.spec = spec
        self.config = config
        self.index = Index()
        self.lock = self.index.lock
        self.tables: dict[TierName, SlotTable] = {}
        capacities = {GPU: config.gpu_bytes, HOST: config.host_bytes}
        for tier, capacity in capacities.items():
            if capacity:
                self.tables[tier] = SlotTable(max(1, capacity // spec.bytes_per_block))
        self.disk_slots = config.disk_bytes // spec.bytes_per_block if config.disk_bytes else 0
        #: the books of remote blocks (what probes found and saves wrote; the server may have evicted them)
        self.remote_slots = max(1, config.remote_bytes // spec.bytes_per_block) if config.remote_url else 0
        #: `probe(keys) -> leading keys the remote holds` (the remote tier's, or a client of it); None: no probing
        self.remote_probe: Callable[[Sequence[BlockKey]], int] | None = None
        self.tiers = [t for t in (GPU, HOST) if t in self.tables]
        if self.disk_slots:
            self.tiers.append(DISK)
        if self.remote_slots:
            self.tiers.append(REMOTE)
        self.policies = {tier: make_policy(config.policy, self._capacity(tier)) for tier in self.tiers}
        #: the policies that learn from whole requests and take retention hints (`auto`)
        self.learners = [p for p in self.policies.values() if isinstance(p, AutoPolicy)]
        self.pending: dict[int, _Pending] = {}
        self.stats = Stats()
        self._bytes_per_block = spec.bytes_per_block  # a property computed on every call: hoisted
        # hot-path constants (the eviction cascade runs per block)
        self._write_back = config.write_mode is WriteMode.WRITE_BACK
        self._capacities = {tier: self._capacity(tier) for tier in self.tiers}
        #: what len() counts the blocks of each tier by: its slot table's keys, or the disk tier's policy
        self._held = {tier: self.tables[tier].held if tier in self.tables else self.policies[tier]
                      for tier in self.tiers}
        self._below_of = {t: (self.tiers[i + 1] if i + 1 < len(self.tiers) else None) for i, t in enumerate(self.tiers)}
        self._above_of = {t: self.tiers[i - 1] for i, t in enumerate(self.tiers) if i}
        #: the tier prefetch fills: the one just above the disk (host), else the fastest
        self.prefetch_target = self._above_of.get(DISK, self.tiers[0])
        self.index.target = self.prefetch_target
        entries = self.index.entries

        def pinned(key: BlockKey) -> bool:  # `Index.is_pinned` without the method call
            entry = entries.get(key)
            return entry is not None and entry.pins > 0

        def pinned_or_protected(key: BlockKey) -> bool:  # `Index.is_protected`
            entry = entries.get(key)
            return entry is not None and (entry.pins > 0 or bool(entry.protected_by))

        #: victim filters of `_make_room`, per tier: protection only keeps blocks in the prefetch target
        self._keep = {t: (pinned_or_protected if t is self.prefetch_target else pinned) for t in self.tiers}
        #: tier -> what to tell when a block leaves it (the prefetch admission: the target tier; GPU promotion)
        self._drop_hooks: dict[TierName, Callable[[BlockKey], None]] = {}

    # -- books -----------------------------------------------------------------------------------

    @property
    def fastest_tier(self) -> TierName:
        return self.tiers[0]

    # A tier's policy holds exactly the keys the index places in that tier (only `_add` and `_drop`
    # change either), so the index answers "is it in the policy?" without asking the policy.

    def _add(self, key: BlockKey, tier: TierName, slot: int, depth: int = 0, parent: BlockKey | None = None) -> None:
        entry = self.index.entries.get(key)
        held = entry is not None and tier in entry.slots
        self.index.add(key, tier, slot, depth, parent)
        if held:
            self.policies[tier].access(key)
        else:
            self.policies[tier].insert(key, parent)

    def _drop(self, key: BlockKey, tier: TierName) -> None:
        hook = self._drop_hooks.get(tier)
        if hook is not None:
            hook(key)
        if self.index.drop(key, tier) is not None:
            self.policies[tier].remove(key)
        table = self.tables.get(tier)
        if table is not None:
            table.free(key)

    def close(self) -> None:
        """Ends the books (unusable afterwards): forgets every block and pending command now. A
        decider's objects refer to each other, so without this a finished simulation's books (0.7 M
        objects for the shared trace) wait for a pass of the cyclic collector, which walks them all."""
        with self.lock:
            self.index.clear()
            self.pending.clear()

    def count_in(self, tier: TierName) -> int:
        return len(self.tables[tier]) if tier in self.tables else len(self.policies[tier])

    def _capacity(self, tier: TierName) -> int:
        if tier in self.tables:
            return self.tables[tier].num_slots
        return self.disk_slots if tier is DISK else self.remote_slots

    def _make_room(self, tier: TierName, num: int, out: list[Command], request_id: str | None) -> int:
        """Frees up to `num` slots in `tier` (demoting or dropping victims); returns how many are free.

        Victims are never pinned, nor protected in the prefetch target tier (module docstring).
        """
        capacity, held = self._capacities[tier], self._held[tier]
        free = capacity - len(held)
        if free >= num:
            return free
        policy, keep = self.policies[tier], self._keep[tier]
        while capacity - len(held) < num:
            victim = policy.victim(keep)
            if victim is None:
                break
            self._evict(victim, tier, out, request_id)
        return max(0, capacity - len(held))

    def _evict(self, key: BlockKey, tier: TierName, out: list[Command], request_id: str | None) -> None:
        entry = self.index.entries.get(key)
        below = self._below_of[tier]
        # nothing is demoted into the remote: every saved block was written through to it already
        demote = (entry is not None and below is not None and below not in entry.slots and below is not REMOTE
                  and (tier is not HOST or self._write_back or below is not DISK))
        if demote and self._make_room(below, 1, out, request_id) > 0:
            dst_slot = self._allocate(below, key)
            if dst_slot is not None:
                src_slot = entry.slots.get(tier)
                self._add(key, below, dst_slot, entry.depth, entry.parent)
                self._demote(key, tier, below, src_slot, dst_slot, out, request_id)
                self.stats.demoted_blocks += 1
                self._drop(key, tier)  # the copy runs before any later command can reuse the slot
                return
        self.stats.dropped_blocks += 1
        self._drop(key, tier)
        if tier is DISK:
            out.append(Evict(DISK, (key,), request_id))

    def _demote(self, key: BlockKey, tier: TierName, below: TierName, src_slot: int | None, dst_slot: int,
                out: list[Command], request_id: str | None) -> None:
        """Appends the demotion of one block to `out`: joined to the demotion just before it when nothing
        came between them (one command for a run of victims: one job for the byte half instead of one per
        block), unless that would read or write a slot twice in one command."""
        src = (src_slot,) if src_slot is not None and src_slot >= 0 else ()
        dst = (dst_slot,) if dst_slot >= 0 else ()
        last = out[-1] if out else None
        if (type(last) is Move and last.reason is _DEMOTE and last.src is tier and last.dst is below
                and last.request_id == request_id and bool(last.src_slots) == bool(src)
                and bool(last.dst_slots) == bool(dst) and key not in last.keys
                and not (src and src[0] in last.src_slots) and not (dst and dst[0] in last.dst_slots)):
            move = Move(tier, below, last.keys + (key,), last.src_slots + src, last.dst_slots + dst, request_id,
                        _DEMOTE, last.command_id)
            out[-1] = move
            self.pending[move.command_id].command = move
            return
        move = Move(tier, below, (key,), src, dst, request_id, _DEMOTE)
        pending = self._track(move, None)
        pending.on_done = lambda c: self._after_demote(c, pending.command.keys, below)
        out.append(move)

    def _after_demote(self, completion: Completion, keys: tuple[BlockKey, ...], below: TierName) -> list[Command]:
        ok = set(completion.ok)
        for key in keys:
            if key not in ok and self.index.holds(key, below):
                self.stats.failed_blocks += 1
                self._drop(key, below)
        return []

    def _allocate(self, tier: TierName, key: BlockKey) -> int | None:
        table = self.tables.get(tier)
        if table is None:  # the disk or the remote
            return DISK_SLOT if len(self.policies[tier]) < self._capacities[tier] else None
        return table.allocate(key)

    def _track(self, command: Command, on_done: Callable[[Completion], list[Command]] | None) -> _Pending:
        pending = self.pending[command.command_id] = _Pending(command, on_done)
        return pending

    def _forget(self, key: BlockKey) -> None:
        """Drops every copy of a block whose bytes failed (a corrupt disk value): recomputed next time."""
        entry = self.index.get(key)
        if entry is None:
            return
        for tier in list(entry.slots):
            self._drop(key, tier)

    # -- remote ----------------------------------------------------------------------------------

    def probe_remote(self, keys: Sequence[BlockKey]) -> int:
        """Asks the remote which blocks of a prefix it holds now, and books them; returns how many blocks
        of `keys` the remote holds beyond the memory and disk tiers' prefix.

        The part of the prefix that only the remote holds (or nobody) is probed again on every call, one
        round trip per node, with no lock held: kvtier never assumes a block it saved is still there.
        Blocks the probe did not find lose their remote booking (the server evicted them).
        """
        probe = self.remote_probe
        if probe is None or not keys:
            return 0
        with self.lock:
            entries = self.index.lookup(keys)
            first = next((i for i, e in enumerate(entries) if e.best_tier is REMOTE), len(entries))
        if first >= len(keys):
            return 0
        num = probe(keys[first:])
        with self.lock:
            self.stats.remote_probes += 1
            parent = keys[first - 1] if first else None
            for i, key in enumerate(keys[first:first + num], first):
                entry = self.index.get(key)
                if entry is None or REMOTE not in entry.slots:
                    if self._make_room(REMOTE, 1, [], None) <= 0:
                        num = i - first
                        break
                    self._add(key, REMOTE, DISK_SLOT, entry.depth if entry else i, parent)
                parent = key
            for key in keys[first + num:]:
                entry = self.index.get(key)
                if entry is None:
                    break
                if REMOTE in entry.slots and not entry.pins:
                    self._drop(key, REMOTE)
        return num
