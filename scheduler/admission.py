"""Prefetch admission: which queued requests' disk blocks are promoted to host, and when.

A promotion pays only if it lands before its request starts, and must never slow a running request. One
round (`PrefetchAdmission.round`, run whenever the queue or the links change) walks the first
`prefetch_window` queued requests in queue order and, for each:

1. protects its cached prefix's blocks that are in the target tier (host) or on their way there, so
   that no save, staging or other promotion evicts them before it runs;
2. collects its disk-only blocks (not pinned, not already in flight) that its plan would restore were
   they on host: first those its current plan reads from disk (in prompt order), then those it would
   stop recomputing (nearest to that range first); and admits the first n of them as ONE batched `Move`
   disk -> host, where n is the largest count that
   - lands before the request's predicted start: the disk backlog already queued (predicted seconds of
     the loads and promotions issued and not completed) plus the move's own disk time must not exceed
     the sum of the planner's predicted prefills ahead of it (what is left of the running requests'
     prefills, then each earlier queued request's plan given what prefetch will have brought up);
   - fits the reserved prefetch room: blocks protected by queued requests never exceed
     `prefetch_room_share` of the target tier, and host slots are made only from unprotected,
     unpinned victims;
   - keeps at most `prefetch_inflight_blocks` promoted blocks in flight (and the byte budget);
   - is worth it: at least `prefetch_min_blocks` (or the request's whole disk run), and the planner
     predicts a shorter prefill with them on host.

The round stops at the first request that finds the room full. Other duties: `cancel_request` (the
request started or left: its promotions not yet begun are cancelled through `canceller`, which the byte
half provides when it can; without one they simply land), `incoming_slot` / `join` (a load needs a block
still in flight: it waits for that move instead of reading the disk again), `release` (protection ends
when the request's load has finished), and the counters in `Stats`. Where the engine asked for it
(`prefetch_gpu`), each round ends with host -> gpu promotions into free GPU slots (`gpu_promotion`).

Invariants: a block in flight to host has `Entry.incoming` = the move's command id, a booked host slot
and a pin (its disk copy stays); it is recorded in host only when its bytes have landed; every
admitted block is either landed, cancelled (slot freed, pin released) or failed (forgotten); the room
count equals the number of distinct blocks with at least one protecting request.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kvtier.tiers.commands import Command, Completion, Move, MoveReason
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.tier import DISK, GPU, HOST, TierName

from kvtier.scheduler.gpu_promotion import GpuPromotion

#: `canceller(command_id)` -> the keys of that move whose read had not begun (now cancelled)
Canceller = Callable[[int], Sequence[BlockKey]]


@dataclass(slots=True)
class Promotion:
    """One batched disk -> target move in flight."""

    command_id: int
    request_id: str
    slots: dict[BlockKey, int]
    issued_s: float
    duration_s: float
    joined: set[BlockKey] = field(default_factory=set)


class PrefetchAdmission:
    """The prefetch decisions of one `Decider` (module docstring); the caller holds the decider's lock.

    Args:
        books: the decider (its index, slot tables, eviction cascade, queue and running requests).
        planner: predicts prefills (None: no deadline, only room and in-flight bounds apply).
        whole_last_block: the engine loads a prompt's last full block whole after a plan that restores
            every block before it (`Plan.whole_block_stop`); that block is then a candidate too.
    """

    def __init__(self, books: Any, planner: Any, whole_last_block: bool = False) -> None:
        self.books = books
        self.planner = planner
        self._load_stop = operator.attrgetter("whole_block_stop" if whole_last_block else "restore_stop")
        config = books.config
        self.target: TierName = books.prefetch_target
        self.active = (config.prefetch and DISK in books.tiers and self.target is not DISK)
        capacity = books._capacities.get(self.target, 0)
        self.room_blocks = int(capacity * config.prefetch_room_share)
        self.inflight_limit = max(1, min(config.prefetch_inflight_blocks,
                                         config.prefetch_budget_bytes // books._bytes_per_block))
        self.min_blocks = config.prefetch_min_blocks
        if planner is not None:
            self.disk_cost = planner.cost_model.with_block_tokens(books.spec.block_tokens).path(planner.disk_path)
            self.disk_latency_s, self.disk_block_s = self.disk_cost.latency_s, self.disk_cost.block_s
        else:
            self.disk_cost = None
            self.disk_latency_s = self.disk_block_s = 0.0
        self.moves: dict[int, Promotion] = {}
        self.by_request: dict[str, list[int]] = {}
        self.inflight_blocks = 0
        self.disk_backlog_s = 0.0
        self.num_protected = 0
        self.unused: set[BlockKey] = set()
        self.canceller: Canceller | None = None
        books._drop_hooks[self.target] = self._left_target
        #: host -> gpu promotions, where the engine asked for them (`OffloadConfig.prefetch_gpu`)
        self.gpu = (GpuPromotion(books, planner) if config.prefetch and config.prefetch_gpu
                    and GPU in books.tables and HOST in books.tables else None)

    def disk_s(self, num_blocks: int) -> float:
        """Predicted seconds of one batched disk read of `num_blocks` blocks."""
        return self.disk_cost.time_s(num_blocks) if self.disk_cost is not None else 0.0

    # -- protection --------------------------------------------------------------------------------

    def _protect(self, state: Any, entry: Any) -> bool:
        """Protects one block for a queued request; False when the reserved room is full."""
        if entry.key in state.protected:
            return True
        if not entry.protected_by:
            if self.num_protected >= self.room_blocks:
                return False
            self.num_protected += 1
        entry.protected_by.add(state.request_id)
        state.protected.add(entry.key)
        return True

    def release(self, state: Any) -> None:
        """Ends a request's protections (its load finished, or it left)."""
        entries, rid = self.books.index.entries, state.request_id
        for key in state.protected:
            entry = entries.get(key)
            if entry is not None and rid in entry.protected_by:
                entry.protected_by.discard(rid)
                if not entry.protected_by:
                    self.num_protected -= 1
        state.protected.clear()

    def yield_room(self, queued_last_first: Any) -> bool:
        """Releases the protections of the last queued request holding any (a running request needs the
        room); False when no queued request protects anything."""
        for state in queued_last_first:
            if state.protected:
                self.books.stats.prefetch_yielded_blocks += len(state.protected)
                self.release(state)
                return True
        return False

    def _unprotect_key(self, key: BlockKey) -> None:
        entry = self.books.index.entries.get(key)
        if entry is not None and entry.protected_by:
            entry.protected_by.clear()
            self.num_protected -= 1

    def _left_target(self, key: BlockKey) -> None:
        """A block left the target tier (only unprotected ones are victims; a failure drops any)."""
        if key in self.unused:
            self.unused.discard(key)
            self.books.stats.prefetch_evicted_unused_blocks += 1
        entry = self.books.index.entries.get(key)
        if entry is not None and not entry.incoming:
            self._unprotect_key(key)

    # -- the round ---------------------------------------------------------------------------------

    def _running_prefill_left(self, now: float) -> float:
        """Predicted seconds until the running requests' prefills end (they go before any queued one)."""
        left = 0.0
        for state in self.books.running.values():
            if not math.isnan(state.started_s):
                left += max(0.0, state.started_s + state.planned_s - now)
        return left

    def predict(self, state: Any, fast: int, host: int, tiers: list[TierName]) -> Any:
        """The planner's plan of a queued request, its cached prefix tiers as given (cached per request
        while the counts of gpu and host blocks in its prefix stay the same)."""
        signature = (len(tiers), fast, host)
        if state.predicted is not None and state.predicted[0] == signature:
            return state.predicted[1]
        plan = self.planner.plan(tiers[:state.num_tokens // self.books.spec.block_tokens], state.num_tokens)
        state.predicted = (signature, plan)
        return plan

    def round(self, queue: Sequence[Any], out: list[Command]) -> None:
        """Appends one round's promotions (and the demotions that make room for them) to `out`: disk ->
        host, then host -> gpu into free GPU slots where the engine asked for it."""
        self._round_host(queue, out)
        if self.gpu is not None:
            self.gpu.round(queue, out)

    def _round_host(self, queue: Sequence[Any], out: list[Command]) -> None:
        if not self.active or self.room_blocks <= 0:
            return
        books, index, target = self.books, self.books.index, self.target
        entries = index.entries
        now = books.clock()
        ahead = self._running_prefill_left(now) if self.planner is not None else math.inf
        disk, protect = DISK, self._protect
        for state in itertools.islice(queue, books.config.prefetch_window):
            tiers: list[TierName] = []
            add_tier = tiers.append
            candidates: list[tuple[int, Any]] = []
            fast = host = 0
            full = False
            protected = state.protected
            for key in state.keys:
                entry = entries.get(key)
                if entry is None:
                    break
                slots = entry.slots
                if not slots:
                    break
                if entry.incoming or target in slots:
                    if key not in protected and not protect(state, entry):
                        full = True
                        break
                    add_tier(target)
                    host += 1
                elif disk in slots and len(slots) == 1:
                    if not entry.pins:
                        candidates.append((len(tiers), entry))
                    add_tier(disk)
                else:
                    add_tier(entry.best_tier)
                    fast += 1
            if full:
                return
            if candidates:
                host += self._admit(state, candidates, tiers, fast, host, ahead, out)
            if self.planner is not None:
                ahead += self.predict(state, fast, host, tiers).total_s

    def _admit(self, state: Any, candidates: list[tuple[int, Any]], tiers: list[TierName], fast: int, host: int,
               ahead: float, out: list[Command]) -> int:
        """Admits the first n candidates of one request as one move (module docstring); updates `tiers`
        and returns n (0: nothing admitted)."""
        books = self.books
        before = None
        if self.planner is not None:
            # only blocks its plan would restore were they all on host: first those its plan reads from disk
            # now (off the load's critical path), then the front it would stop recomputing, nearest first
            before = self.predict(state, fast, host, tiers)
            best = self._plan_with(state, tiers, candidates)
            lo, hi = before.split, self._load_stop(before)
            wanted = [c for c in candidates if best.split <= c[0] < self._load_stop(best)]
            candidates = ([c for c in wanted if lo <= c[0] < hi] + [c for c in reversed(wanted) if c[0] < lo]
                          + [c for c in wanted if c[0] >= hi])
        n = min(len(candidates), self.inflight_limit - self.inflight_blocks,
                self.room_blocks - self.num_protected)
        if self.planner is not None and self.disk_block_s > 0:
            spare, cost = ahead - self.disk_backlog_s - self.disk_latency_s, self.disk_cost
            fits = cost.blocks_within(spare / cost.block_s) if cost.ramp_blocks else spare // cost.block_s
            n = min(n, int(fits) if spare > 0 else 0)
        if n <= 0 or (n < self.min_blocks and n < len(candidates)):
            return 0
        after = None
        if before is not None:
            after = self._plan_with(state, tiers, candidates[:n])
            if after.total_s >= before.total_s:
                return 0
        room = books._make_room(self.target, n, out, state.request_id)
        if room < n:  # every other block there is pinned or protected: wait for a later round
            return 0
        chosen = candidates[:n]
        keys = tuple(e.key for _, e in chosen)
        slots = []
        for key in keys:
            slot = books._allocate(self.target, key)
            if slot is None:
                break
            slots.append(slot)
        if len(slots) < len(keys):  # cannot happen after _make_room; give the slots back if it does
            for key in keys[:len(slots)]:
                books.tables[self.target].free(key)
            return 0
        books.index.pin(keys)  # the disk copy stays until the bytes have landed
        move = Move(DISK, self.target, keys, (), tuple(slots), state.request_id, MoveReason.PREFETCH)
        duration = self.disk_s(n)
        self.moves[move.command_id] = Promotion(move.command_id, state.request_id, dict(zip(keys, slots)),
                                                books.clock(), duration)
        self.by_request.setdefault(state.request_id, []).append(move.command_id)
        for position, entry in chosen:
            entry.incoming = move.command_id
            self._protect(state, entry)  # fits: n <= room left
            tiers[position] = self.target
        self.inflight_blocks += n
        self.disk_backlog_s += duration
        books.stats.disk_prefetch_s += duration
        books.stats.prefetch_moves += 1
        books._track(move, self._landed)
        out.append(move)
        if after is not None:
            state.predicted = ((len(tiers), fast, host + n), after)
        return n

    def _plan_with(self, state: Any, tiers: list[TierName], promoted: list[tuple[int, Any]]) -> Any:
        """The request's plan were these candidates in the target tier."""
        trial = list(tiers)
        for position, _ in promoted:
            trial[position] = self.target
        return self.planner.plan(trial[:state.num_tokens // self.books.spec.block_tokens], state.num_tokens)

    # -- landing, cancelling, joining --------------------------------------------------------------

    def _landed(self, completion: Completion) -> list[Command]:
        promo = self.moves.pop(completion.command_id, None)
        if promo is None:
            return []
        self._forget_move(promo)
        books, entries = self.books, self.books.index.entries
        ok = set(completion.ok) - set(completion.failed)
        books.stats.promotion_latency_s += books.clock() - promo.issued_s
        for key, slot in promo.slots.items():
            entry = entries.get(key)
            if entry is not None and entry.incoming == promo.command_id:
                entry.incoming = 0
            if key in ok and entry is not None and entry.slots:
                books._add(key, self.target, slot, entry.depth, entry.parent)
                books.stats.prefetched_blocks += 1
                if key in promo.joined:
                    books.stats.prefetch_used_blocks += 1
                else:
                    self.unused.add(key)
            else:
                table = books.tables[self.target]
                if table.slot_of(key) == slot and not books.index.holds(key, self.target):
                    table.free(key)
                self._unprotect_key(key)
                if key not in ok:
                    books.stats.failed_blocks += 1
                    books._forget(key)
            books.index.unpin((key,))
        return []

    def _forget_move(self, promo: Promotion) -> None:
        self.inflight_blocks -= len(promo.slots)
        self.disk_backlog_s = max(0.0, self.disk_backlog_s - promo.duration_s)
        ids = self.by_request.get(promo.request_id)
        if ids is not None:
            if promo.command_id in ids:
                ids.remove(promo.command_id)
            if not ids:
                del self.by_request[promo.request_id]

    def cancel_moves(self, command_ids: Sequence[int]) -> None:
        """Cancels the not-yet-begun reads of these promotions (when the byte half can say which)."""
        if self.canceller is None:
            return
        books, entries = self.books, self.books.index.entries
        for cid in list(command_ids):
            promo = self.moves.get(cid)
            if promo is None:
                continue
            cancelled = [k for k in self.canceller(cid) if k in promo.slots]
            for key in cancelled:
                slot = promo.slots.pop(key)
                table = books.tables[self.target]
                if table.slot_of(key) == slot and not books.index.holds(key, self.target):
                    table.free(key)
                entry = entries.get(key)
                if entry is not None and entry.incoming == cid:
                    entry.incoming = 0
                self._unprotect_key(key)
                books.index.unpin((key,))
            books.stats.prefetch_cancelled_blocks += len(cancelled)
            self.inflight_blocks -= len(cancelled)
            left = self.disk_s(len(promo.slots))  # the read of what is left (ramped like the whole was)
            share, promo.duration_s = promo.duration_s - left, left
            self.disk_backlog_s = max(0.0, self.disk_backlog_s - share)
            books.stats.disk_prefetch_s -= share
            if not promo.slots:  # nothing left to land: no completion is expected
                self.moves.pop(cid, None)
                books.pending.pop(cid, None)
                promo.slots = {}
                self._forget_move(promo)

    def cancel_request(self, request_id: str) -> None:
        """The request started or left: its promotions not yet begun are cancelled."""
        ids = self.by_request.get(request_id)
        if ids:
            self.cancel_moves(list(ids))

    def incoming_slot(self, entry: Any) -> tuple[int, int] | None:
        """(command id, target slot) of the promotion carrying this block, or None."""
        promo = self.moves.get(entry.incoming) if entry.incoming else None
        if promo is None or entry.key not in promo.slots:
            return None
        return promo.command_id, promo.slots[entry.key]

    def join(self, entry: Any, command_id: int) -> None:
        """A load takes this block from its promotion in flight (counted as used when it lands)."""
        self.moves[command_id].joined.add(entry.key)
        self.books.stats.prefetch_joined_blocks += 1

    def used(self, key: BlockKey, tier: TierName) -> None:
        """A load read this block from `tier` (counted where a promotion brought it there)."""
        if tier is not self.target:
            if tier is GPU and self.gpu is not None:
                self.gpu.used(key)
            return
        if key in self.unused:
            self.unused.discard(key)
            self.books.stats.prefetch_used_blocks += 1
