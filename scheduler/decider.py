"""Decider: the decision half. Turns engine events into commands for the byte half.

Primitives (all called with no lock held; the decider takes its own):
- `enqueue(request_id, keys, num_tokens)` / `cancel(request_id)` / `finish(request_id)`: the waiting
  queue the prefetcher looks over;
- `next_prefetch()`: promotions for queued requests (disk -> host -> gpu), within the look-ahead window
  and the byte budget; the blocks involved are protected from eviction until the request runs or goes;
- `lookup(keys)`, `plan(request_id)`: matched prefix and the planner's restore-vs-recompute plan;
- `start_load(request_id, plan, dst_blocks)`: the `Load` of the blocks the plan restores (disk blocks go
  through host slots, which keep a host copy); `start_save(request_id, keys, src_blocks)`: the `Save`
  of new blocks, after the demotions or drops that make room;
- `complete(completion)`: applies a command's outcome to the books and returns follow-up commands
  (write-through of saved blocks to disk).

Invariants:
- the decider never touches bytes; everything it asks for is a picklable command (tiers/commands.py);
- every command that touches pool memory runs on the byte half's one FIFO copy worker in submission
  order (tiers/executor.py), so a slot freed here (a demotion's source) may be reused by the next command
  at once: its bytes are copied out first. Blocks are visible in a tier only once their bytes are there
  or queued ahead of any reader (a disk -> host promotion is recorded on completion);
- pinned blocks (pins > 0) are never victims; blocks protected by queued requests only when nothing
  else can go; a save that finds no room saves fewer blocks (the prefix that fits), never fails;
- on a failed load or promotion the failed blocks are dropped from the books, so the next lookup
  stops before them and the engine recomputes them.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kvtier.tiers.commands import Command, Completion, Evict, Load, Move, MoveReason, Save
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.slots import SlotTable
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName

from kvtier.scheduler.config import OffloadConfig, WriteMode
from kvtier.scheduler.index import DISK_SLOT, Entry, Index
from kvtier.scheduler.policies import AutoPolicy, RetentionHint, make_policy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestState:
    """What the decider knows of one request."""

    request_id: str
    keys: tuple[BlockKey, ...]
    num_tokens: int
    queued_s: float
    protected: set[BlockKey] = field(default_factory=set)
    running: bool = False
    #: `Index.epoch` when a prefetch scan last found nothing to promote (-1: not so), and the prefix length then
    idle_epoch: int = -1
    idle_blocks: int = 0
    #: what the engine said about the request's blocks (session, continues, priority), if anything
    hint: RetentionHint | None = None


@dataclass(slots=True)
class Stats:
    """Counters of the decision half (see `OffloadManager.stats`)."""

    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0
    hit_blocks_by_tier: dict[str, int] = field(default_factory=dict)
    restored_blocks: int = 0
    recomputed_cached_blocks: int = 0
    prefetched_blocks: int = 0
    prefetch_ready_blocks: int = 0
    saved_blocks: int = 0
    saves_skipped_no_room: int = 0
    demoted_blocks: int = 0
    dropped_blocks: int = 0
    failed_blocks: int = 0
    written_to_disk_blocks: int = 0


@dataclass(slots=True)
class _Pending:
    command: Command
    on_done: Callable[[Completion], list[Command]] | None = None


class Decider:
    """The books and the decisions of one OffloadManager (or one vLLM scheduler-side connector)."""

    def __init__(self, spec: KVSpec, config: OffloadConfig, planner: Any = None,
                 has_engine_gpu: bool = True) -> None:
        self.spec = spec
        self.config = config
        self.planner = planner
        self.index = Index()
        self.lock = self.index.lock
        self.tables: dict[TierName, SlotTable] = {}
        capacities = {TierName.GPU: config.gpu_bytes, TierName.HOST: config.host_bytes}
        for tier, capacity in capacities.items():
            if capacity:
                self.tables[tier] = SlotTable(max(1, capacity // spec.bytes_per_block))
        self.disk_slots = config.disk_bytes // spec.bytes_per_block if config.disk_bytes else 0
        self.tiers = [t for t in (TierName.GPU, TierName.HOST) if t in self.tables]
        if self.disk_slots:
            self.tiers.append(TierName.DISK)
        self.policies = {tier: make_policy(config.policy, self._capacity(tier)) for tier in self.tiers}
        #: the policies that learn from whole requests and take retention hints (`auto`)
        self._learners = [p for p in self.policies.values() if isinstance(p, AutoPolicy)]
        self.queue: OrderedDict[str, RequestState] = OrderedDict()
        self.running: dict[str, RequestState] = {}
        self.pending: dict[int, _Pending] = {}
        self.inflight_prefetch_bytes = 0
        self.stats = Stats()
        self._pre: list[Command] = []
        self._bytes_per_block = spec.bytes_per_block  # a property computed on every call: hoisted
        # hot-path constants (the eviction cascade and prefetch rounds run per block)
        self._capacities = {tier: self._capacity(tier) for tier in self.tiers}
        #: what len() counts the blocks of each tier by: its slot table, or the disk tier's policy
        self._held = {tier: self.tables.get(tier, self.policies[tier]) for tier in self.tiers}
        self._below_of = {t: (self.tiers[i + 1] if i + 1 < len(self.tiers) else None) for i, t in enumerate(self.tiers)}
        self._above_of = {t: self.tiers[i - 1] for i, t in enumerate(self.tiers) if i}
        entries = self.index.entries
        self.index.target = self.tiers[0]

        def pinned(key: BlockKey) -> bool:  # `Index.is_pinned` without the method call
            entry = entries.get(key)
            return entry is not None and entry.pins > 0

        def pinned_or_protected(key: BlockKey) -> bool:  # `Index.is_protected`
            entry = entries.get(key)
            return entry is not None and (entry.pins > 0 or bool(entry.protected_by))

        #: victim filters of `_make_room`: [allow_protected]
        self._keep = {False: pinned_or_protected, True: pinned}

    # -- books -----------------------------------------------------------------------------------

    @property
    def fastest_tier(self) -> TierName:
        return self.tiers[0]

    def _below(self, tier: TierName) -> TierName | None:
        return self._below_of[tier]

    def _add(self, key: BlockKey, tier: TierName, slot: int, depth: int = 0, parent: BlockKey | None = None) -> None:
        self.index.add(key, tier, slot, depth, parent)
        policy = self.policies[tier]
        if key in policy:
            policy.access(key)
        else:
            policy.insert(key, parent)

    def _drop(self, key: BlockKey, tier: TierName) -> None:
        self.index.drop(key, tier)
        policy = self.policies[tier]
        if key in policy:
            policy.remove(key)
        table = self.tables.get(tier)
        if table is not None:
            table.free(key)

    def _evictable(self, tier: TierName, allow_protected: bool) -> Callable[[BlockKey], bool]:
        """The predicate of keys `_make_room` must not evict: pinned ones, and protected ones unless allowed."""
        return self._keep[allow_protected]

    def count_in(self, tier: TierName) -> int:
        return len(self.tables[tier]) if tier in self.tables else len(self.policies[tier])

    def _capacity(self, tier: TierName) -> int:
        return self.tables[tier].num_slots if tier in self.tables else self.disk_slots

    def _make_room(self, tier: TierName, num: int, out: list[Command], request_id: str | None,
                   allow_protected: bool = True) -> int:
        """Frees up to `num` slots in `tier` (demoting or dropping victims); returns how many are free.

        With `allow_protected=False` (prefetch) blocks that queued requests need are never victims: a
        promotion for one queued request must not push out another's (they would chase each other).
        """
        capacity, held = self._capacities[tier], self._held[tier]
        free = capacity - len(held)
        if free >= num:
            return free
        policy = self.policies[tier]
        for allow in ((False, True) if allow_protected else (False,)):
            keep = self._keep[allow]
            while capacity - len(held) < num:
                victim = policy.victim(keep)
                if victim is None:
                    break
                self._evict(victim, tier, out, request_id)
        return max(0, capacity - len(held))

    def _evict(self, key: BlockKey, tier: TierName, out: list[Command], request_id: str | None) -> None:
        entry = self.index.get(key)
        below = self._below_of[tier]
        demote = (entry is not None and below is not None and below not in entry.slots
                  and (tier is not TierName.HOST or self.config.write_mode is WriteMode.WRITE_BACK
                       or below is not TierName.DISK))
        if demote and self._make_room(below, 1, out, request_id) > 0:
            dst_slot = self._allocate(below, key)
            if dst_slot is not None:
                src_slot = entry.slots.get(tier)
                self._add(key, below, dst_slot, entry.depth, entry.parent)
                move = Move(tier, below, (key,), (src_slot,) if src_slot is not None and src_slot >= 0 else (),
                            (dst_slot,) if dst_slot >= 0 else (), request_id, MoveReason.DEMOTE)
                self._track(move, lambda c, k=key, t=below: self._after_demote(c, k, t))
                out.append(move)
                self.stats.demoted_blocks += 1
                self._drop(key, tier)  # the copy runs before any later command can reuse the slot
                return
        self.stats.dropped_blocks += 1
        self._drop(key, tier)
        if tier is TierName.DISK:
            out.append(Evict(TierName.DISK, (key,), request_id))

    def _after_demote(self, completion: Completion, key: BlockKey, below: TierName) -> list[Command]:
        if not completion.ok and self.index.holds(key, below):
            self.stats.failed_blocks += 1
            self._drop(key, below)
        return []

    def _allocate(self, tier: TierName, key: BlockKey) -> int | None:
        table = self.tables.get(tier)
        if table is None:  # the disk
            return DISK_SLOT if len(self.policies[tier]) < self.disk_slots else None
        return table.allocate(key)

    def _track(self, command: Command, on_done: Callable[[Completion], list[Command]] | None) -> None:
        self.pending[command.command_id] = _Pending(command, on_done)

    # -- queue and prefetch ----------------------------------------------------------------------

    def enqueue(self, request_id: str, keys: Sequence[BlockKey], num_tokens: int,
                hint: RetentionHint | None = None) -> None:
        """Records a queued request (its keys computed by the caller) and its optional retention hint;
        policies that learn from the request stream (`auto`) see its keys now."""
        with self.lock:
            state = RequestState(request_id, tuple(keys), num_tokens, time.monotonic(), hint=hint)
            self.queue[request_id] = state
            for policy in self._learners:
                policy.observe(state.keys)

    def request(self, request_id: str) -> RequestState | None:
        return self.queue.get(request_id) or self.running.get(request_id)

    def next_prefetch(self) -> list[Command]:
        """Promotions for the first `prefetch_window` queued requests, within the byte budget."""
        out: list[Command] = []
        if not self.config.prefetch:
            return out
        with self.lock:
            try:
                self._prefetch_round(out)
            except Exception:  # commands already decided (and tracked) must still run
                log.exception("prefetch round failed")
        return out

    def _prefetch_round(self, out: list[Command]) -> None:
        """Appends the promotions of one round to `out` (the caller holds the lock).

        Each window request's cached prefix is protected, then its blocks that are neither in the fastest
        tier nor pinned go one hop up, in prompt order, until the byte budget is spent (the round ends) or
        a destination tier has no room left for a promotion (that tier is skipped for the rest of the round).
        A request whose last scan found nothing to promote is not scanned again until `Index.epoch` moves
        (its answer cannot have changed; the effect is the same as scanning it).
        """
        target = self.tiers[0]
        bpb, budget = self._bytes_per_block, self.config.prefetch_budget_bytes
        index = self.index
        scan, pin, unpin = index.scan_for_prefetch, index.pin, index.unpin
        above, tables = self._above_of, self.tables
        full: set[TierName] = set()
        for state in itertools.islice(self.queue.values(), self.config.prefetch_window):
            if state.idle_epoch == index.epoch:  # nothing changed since a scan found nothing to do: skip it
                if state.idle_blocks and self.inflight_prefetch_bytes + bpb > budget:
                    return
                continue
            entries, first = scan(state.request_id, state.keys, state.protected, target)
            if first == len(entries):
                state.idle_epoch, state.idle_blocks = index.epoch, first
            else:
                state.idle_epoch = -1
            if entries and self.inflight_prefetch_bytes + bpb > budget:
                return
            for entry in entries[first:]:
                if self.inflight_prefetch_bytes + bpb > budget:
                    return
                slots = entry.slots
                if target in slots or entry.pins:
                    continue
                src = entry.best_tier
                # one hop up per round: disk -> host, host -> gpu; pinned first, so that making
                # room above can never evict this very block
                dst = above[src]
                if dst in full:
                    continue
                key = entry.key
                pin((key,))
                slot = (self._allocate(dst, key)
                        if self._make_room(dst, 1, out, state.request_id, allow_protected=False) else None)
                if slot is None:
                    full.add(dst)  # every block there is pinned or wanted by a queued request: stop filling it
                if slot is None or src not in slots:
                    if slot is not None:
                        tables[dst].free(key)
                    unpin((key,))
                    continue
                # recorded in `dst` when the bytes have landed; pinned meanwhile in its source
                src_slot = slots[src]
                move = Move(src, dst, (key,), (src_slot,) if src_slot >= 0 else (), (slot,),
                            state.request_id, MoveReason.PREFETCH)
                self.inflight_prefetch_bytes += bpb
                self._track(move, lambda c, k=key, d=dst, s=slot: self._after_promote(c, k, d, s))
                out.append(move)

    def _after_promote(self, completion: Completion, key: BlockKey, dst: TierName, slot: int) -> list[Command]:
        self.inflight_prefetch_bytes -= self._bytes_per_block
        entry = self.index.get(key)
        if completion.ok and entry is not None and entry.slots:
            self.stats.prefetched_blocks += 1
            self._add(key, dst, slot, entry.depth, entry.parent)
            self.index.unpin([key])  # after the add: a block landed in the target gives no new work
            return []
        self.index.unpin([key])
        if dst in self.tables and self.tables[dst].slot_of(key) == slot and not self.index.holds(key, dst):
            self.tables[dst].free(key)
        if not completion.ok:
            self.stats.failed_blocks += 1
            self._forget(key)
        return []

    def _forget(self, key: BlockKey) -> None:
        """Drops every copy of a block whose bytes failed (a corrupt disk value): recomputed next time."""
        entry = self.index.get(key)
        if entry is None:
            return
        for tier in list(entry.slots):
            self._drop(key, tier)

    def cancel(self, request_id: str) -> None:
        """Forgets a queued or running request (its promotions finish, its protections go)."""
        with self.lock:
            state = self.queue.pop(request_id, None) or self.running.pop(request_id, None)
            if state is not None:
                self.index.unprotect(request_id, state.protected)

    def finish(self, request_id: str, hint: RetentionHint | None = None) -> None:
        """The request is done: its protections go, and its retention hint (this one, else the one given
        at `enqueue`) reaches the policies that take hints (`auto`): a session that ends lets its
        own blocks go first."""
        with self.lock:
            state = self.queue.pop(request_id, None) or self.running.pop(request_id, None)
            if state is None:
                return
            self.index.unprotect(request_id, state.protected)
            hint = hint or state.hint
            if hint is not None:
                for policy in self._learners:
                    policy.hint(state.keys, hint)

    # -- lookup, plan, load ----------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockKey]) -> list[Entry]:
        """Entries of the leading cached blocks (any tier)."""
        with self.lock:
            entries = self.index.lookup(keys)
            self.stats.lookups += 1
            self.stats.lookup_blocks += len(keys)
            return entries

    def lookup_codes(self, keys: Sequence[BlockKey]) -> Any:
        """`lookup` as the tier code of each leading cached block (`Index.prefix_codes`: 0 gpu, 1 host, 2 disk)."""
        with self.lock:
            codes = self.index.prefix_codes(keys)
            self.stats.lookups += 1
            self.stats.lookup_blocks += len(keys)
            return codes

    def plan(self, request_id: str, keys: Sequence[BlockKey] | None = None, num_tokens: int | None = None) -> Any:
        """The planner's plan for a request (matched prefix, split point, predicted times)."""
        with self.lock:
            state = self.request(request_id)
            if keys is None:
                if state is None:
                    raise KeyError(f"unknown request {request_id!r}")
                keys, num_tokens = state.keys, state.num_tokens
            codes = self.index.prefix_codes(keys)
        return self.planner.plan(codes, num_tokens if num_tokens is not None else len(keys) * self.spec.block_tokens)

    def start_load(self, request_id: str, keys: Sequence[BlockKey], first: int, stop: int,
                   dst_blocks: Sequence[int]) -> Load | None:
        """The `Load` of blocks [first, stop) of `keys` into engine blocks `dst_blocks` (pins them).

        Returns None when a block is no longer cached (the caller recomputes instead).
        """
        with self.lock:
            state = self.queue.pop(request_id, None) or self.running.get(request_id)
            if state is not None:
                state.running = True
                self.running[request_id] = state
            if stop <= first:
                return None
            entries = self.index.lookup(keys[:stop])[first:]
            if len(entries) < stop - first:
                log.debug("load of %s: blocks [%d, %d) no longer all cached; recomputing", request_id, first, stop)
                return None
            loaded = [e.key for e in entries]
            self.index.pin(loaded)  # first: staging room below must never evict a block of this load
            tiers, slots = [], []
            out: list[Command] = []
            staged: list[tuple[BlockKey, int]] = []
            for entry in entries:
                tier = entry.best_tier
                if tier is TierName.DISK:
                    host = TierName.HOST
                    slot = (self._allocate(host, entry.key)
                            if host in self.tables and self._make_room(host, 1, out, request_id) else None)
                    if slot is None:
                        for key, _ in staged:
                            self.tables[host].free(key)
                        self.index.unpin(loaded)
                        self._pre.extend(out)
                        log.debug("load of %s: no host slot to stage a disk block; recomputing", request_id)
                        return None
                    staged.append((entry.key, slot))  # recorded in host once the read has landed
                    slots.append(slot)
                else:
                    slots.append(entry.slots[tier])
                tiers.append(tier)
            for tier in tiers:
                self.stats.hit_blocks_by_tier[str(tier)] = self.stats.hit_blocks_by_tier.get(str(tier), 0) + 1
                if tier is self.fastest_tier:
                    self.stats.prefetch_ready_blocks += 1
            self.index.touch(entries)
            for key in loaded:
                for tier in list(self.index.get(key).slots):
                    if key in self.policies[tier]:
                        self.policies[tier].access(key)
            self.stats.restored_blocks += len(loaded)
            self.stats.hit_blocks += len(loaded)
            load = Load(tuple(loaded), tuple(tiers), tuple(slots), tuple(dst_blocks), self.config.num_layer_groups,
                        request_id)
            self._track(load, lambda c, ks=tuple(loaded), st=tuple(staged): self._after_load(c, ks, st))
            self._pre.extend(out)  # demotions and drops, to run before the load
            return load

    def take_prepared(self) -> list[Command]:
        """Commands decided while preparing the last load (to be submitted before it)."""
        out, self._pre = self._pre, []
        return out

    def _after_load(self, completion: Completion, keys: tuple[BlockKey, ...],
                    staged: tuple[tuple[BlockKey, int], ...]) -> list[Command]:
        failed = set(completion.failed)
        for key, slot in staged:
            entry = self.index.get(key)
            if key not in failed and entry is not None:
                self._add(key, TierName.HOST, slot, entry.depth, entry.parent)
            elif not self.index.holds(key, TierName.HOST):
                self.tables[TierName.HOST].free(key)
        self.index.unpin(keys)
        for key in failed:
            self.stats.failed_blocks += 1
            self._forget(key)
        return []

    # -- save ------------------------------------------------------------------------------------

    def start_save(self, request_id: str, keys: Sequence[BlockKey], src_blocks: Sequence[int],
                   first_depth: int = 0) -> list[Command]:
        """Commands that save the blocks not cached yet: room-making moves first, then one `Save`.

        Blocks are saved in prompt order; when room runs out, the rest are skipped (a prefix is kept).
        """
        out: list[Command] = []
        with self.lock:
            tier = self.fastest_tier
            new: list[tuple[int, BlockKey, int]] = []  # (position, key, slot)
            parent: BlockKey | None = None
            index = self.index
            entries, touch, now = index.entries, index.touch, time.monotonic()
            for i, key in enumerate(keys):
                entry = entries.get(key)
                if entry is not None:
                    touch((entry,), now)
                    parent = key
                    continue
                if self._make_room(tier, 1, out, request_id) <= 0:
                    self.stats.saves_skipped_no_room += len(keys) - i
                    break
                slot = self._allocate(tier, key)
                if slot is None:
                    self.stats.saves_skipped_no_room += len(keys) - i
                    break
                self._add(key, tier, slot, first_depth + i, parent)
                index.pin((key,))  # until its bytes have landed
                new.append((i, key, slot))
                parent = key
            if not new:
                return out
            save = Save(tuple(k for _, k, _ in new), tuple(src_blocks[i] for i, _, _ in new), tier,
                        tuple(s for _, _, s in new), request_id)
            self._track(save, lambda c, t=tier: self._after_save(c, t))
            out.append(save)
        return out

    def _after_save(self, completion: Completion, tier: TierName) -> list[Command]:
        self.index.unpin(completion.ok + completion.failed)
        for key in completion.failed:
            self._forget(key)
        self.stats.saved_blocks += len(completion.ok)
        if self.config.write_mode is not WriteMode.WRITE_THROUGH or TierName.DISK not in self.tiers:
            return []
        out: list[Command] = []
        keys, slots = [], []
        for key in completion.ok:
            entry = self.index.get(key)
            if entry is None or TierName.DISK in entry.slots or tier not in entry.slots:
                continue
            if self._make_room(TierName.DISK, 1, out, completion.request_id) <= 0:
                break
            self._add(key, TierName.DISK, DISK_SLOT, entry.depth, entry.parent)
            keys.append(key)
            slots.append(entry.slots[tier])
        if keys:
            move = Move(tier, TierName.DISK, tuple(keys), tuple(slots), (), completion.request_id, MoveReason.WRITE_THROUGH)
            self._track(move, lambda c, t=tier: self._after_write(c, t))
            out.append(move)
        return out

    def _after_write(self, completion: Completion, tier: TierName) -> list[Command]:
        self.stats.written_to_disk_blocks += len(completion.ok)
        for key in completion.failed:
            if self.index.holds(key, TierName.DISK):
                self._drop(key, TierName.DISK)
        return []

    # -- completions -----------------------------------------------------------------------------

    def complete(self, completion: Completion) -> list[Command]:
        """Applies a command's outcome; returns follow-up commands to submit."""
        with self.lock:
            pending = self.pending.pop(completion.command_id, None)
            if pending is None or pending.on_done is None:
                return []
            if completion.error:
                log.warning("command %s of request %s failed: %s", type(pending.command).__name__,
                            completion.request_id, completion.error)
            return pending.on_done(completion)

    def drop_tier(self, tier: TierName) -> int:
        """Forgets every unpinned block's copy in `tier` (e.g. emptying the host tier); returns how many."""
        with self.lock:
            keys = [k for k in self.index.keys_in(tier) if not self.index.is_pinned(k)]
            for key in keys:
                self._drop(key, tier)
            return len(keys)

    def rebuild_from_disk(self, keys: Sequence[BlockKey]) -> int:
        """Adds the disk store's listing after a restart; returns how many blocks."""
        with self.lock:
            n = 0
            for key in keys:
                if TierName.DISK in self.policies and n < self.disk_slots:
                    self._add(key, TierName.DISK, DISK_SLOT)
                    n += 1
            return n
