"""Decider: the decision half. Turns engine events into commands for the byte half.

Primitives (all called with no lock held; the decider takes its own):
- `enqueue(request_id, keys, num_tokens)` / `cancel(request_id)` / `finish(request_id)`: the waiting
  queue the prefetch admission looks over;
- `next_prefetch()`: promotions disk -> host for queued requests, admitted by deadline and room
  (`kvtier.scheduler.admission`); the blocks involved are protected until the request's load finishes;
- `lookup(keys)`, `plan(request_id)`: matched prefix and the planner's restore-vs-recompute plan;
- `start_load(request_id, keys, first, stop, dst_blocks)`: the `Load` of the blocks the plan restores
  (disk blocks go through host slots, which keep a host copy; a block still being promoted joins that
  move: the load waits for it (`Load.after`) instead of reading the disk again; its layer groups are
  sized by the planner's predicted compute and load, `Planner.layer_groups`);
  `start_save(request_id, keys, src_blocks)`: the `Save` of new blocks, after the demotions or drops
  that make room;
- `complete(completion)`: applies a command's outcome to the books and returns follow-up commands
  (write-through of saved blocks to disk).

Invariants:
- the decider never touches bytes; everything it asks for is a picklable command (tiers/commands.py);
- every command that touches pool memory runs on the byte half's one FIFO copy worker in submission
  order (tiers/executor.py), so a slot freed here (a demotion's source) may be reused by the next command
  at once: its bytes are copied out first. Blocks are visible in a tier only once their bytes are there
  or queued ahead of any reader (a disk -> host promotion is recorded on completion);
- pinned blocks (pins > 0) are never victims, protected blocks never in host (`books`); a save that
  finds no room saves fewer blocks (the prefix that fits), never fails;
- on a failed load or promotion the failed blocks are dropped from the books, so the next lookup
  stops before them and the engine recomputes them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Sequence

from kvtier.tiers.commands import Command, Completion, Load, Move, MoveReason, Save
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import DISK, HOST, REMOTE, TierName

from kvtier.scheduler.admission import Canceller, PrefetchAdmission
from kvtier.scheduler.books import Books, Stats  # noqa: F401 (Stats re-exported)
from kvtier.scheduler.config import OffloadConfig, WriteMode
from kvtier.scheduler.index import DISK_SLOT, Entry
from kvtier.scheduler.policies import RetentionHint
from kvtier.scheduler.request_state import RequestState

log = logging.getLogger(__name__)


class Decider(Books):
    """The books and the decisions of one OffloadManager (or one vLLM scheduler-side connector).

    Args:
        spec: the KV geometry (block size).
        config: capacities, policy, prefetch settings.
        planner: restore-vs-recompute plans (None: `plan` is unavailable, prefetch has no deadline).
        has_engine_gpu: kept for callers; the engine's own GPU memory is never a prefetch target.
        clock: seconds, monotonic (the simulator passes its simulated clock).
        whole_last_block: the engine loads a prompt's last full block whole and recomputes its last token
            on top (vLLM's connector), so prefetch promotes that block too (`PrefetchAdmission`).
    """

    def __init__(self, spec: KVSpec, config: OffloadConfig, planner: Any = None,
                 has_engine_gpu: bool = True, clock: Callable[[], float] = time.monotonic, *,
                 whole_last_block: bool = False) -> None:
        super().__init__(spec, config)
        self.planner = planner
        self.clock = clock
        self.queue: OrderedDict[str, RequestState] = OrderedDict()
        self.running: dict[str, RequestState] = {}
        self.admission = PrefetchAdmission(self, planner, whole_last_block)
        self._pre: list[Command] = []

    def set_canceller(self, canceller: Canceller | None) -> None:
        """How to cancel a promotion's not-yet-begun reads (the byte half's, when it can)."""
        with self.lock:
            self.admission.canceller = canceller

    # -- queue and prefetch ----------------------------------------------------------------------

    def enqueue(self, request_id: str, keys: Sequence[BlockKey], num_tokens: int,
                hint: RetentionHint | None = None) -> None:
        """Records a queued request (its keys computed by the caller) and its optional retention hint;
        policies that learn from the request stream (`auto`) see its keys now."""
        with self.lock:
            state = RequestState(request_id, tuple(keys), num_tokens, self.clock(), hint=hint)
            self.queue[request_id] = state
            for policy in self.learners:
                policy.observe(state.keys)

    def request(self, request_id: str) -> RequestState | None:
        return self.queue.get(request_id) or self.running.get(request_id)

    def next_prefetch(self) -> list[Command]:
        """Promotions for queued requests (module docstring of `admission`), with their room-making moves."""
        out: list[Command] = []
        if not self.config.prefetch:
            return out
        with self.lock:
            try:
                self.admission.round(self.queue.values(), out)
            except Exception:  # commands already decided (and tracked) must still run
                log.exception("prefetch round failed")
        return out

    def cancel(self, request_id: str) -> RequestState | None:
        """Forgets a queued or running request: its promotions not yet begun are cancelled, its
        protections go (promotions already reading land). Returns what was known of it."""
        with self.lock:
            state = self.queue.pop(request_id, None) or self.running.pop(request_id, None)
            if state is not None:
                self.admission.cancel_request(request_id)
                self.admission.release(state)
            return state

    def finish(self, request_id: str, hint: RetentionHint | None = None) -> None:
        """The request is done (`cancel`), and its retention hint (this one, else the one given at
        `enqueue`) reaches the policies that take hints (`auto`): a session that ends lets its own
        blocks go first."""
        with self.lock:
            state = self.cancel(request_id)
            hint = hint or (state.hint if state is not None else None)
            if state is not None and hint is not None:
                for policy in self.learners:
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
        """`lookup` as the tier code of each leading cached block (`Index.prefix_codes`: 0 gpu .. 3 remote)."""
        with self.lock:
            codes = self.index.prefix_codes(keys)
            self.stats.lookups += 1
            self.stats.lookup_blocks += len(keys)
            return codes

    def plan(self, request_id: str, keys: Sequence[BlockKey] | None = None, num_tokens: int | None = None) -> Any:
        """The planner's plan for a request (matched prefix, split point, predicted times).

        A block still in flight to host counts as on disk (the load may have to read it).
        """
        with self.lock:
            state = self.request(request_id)
            if keys is None:
                if state is None:
                    raise KeyError(f"unknown request {request_id!r}")
                keys, num_tokens = state.keys, state.num_tokens
            codes = self.index.prefix_codes(keys)
        plan = self.planner.plan(codes, num_tokens if num_tokens is not None else len(keys) * self.spec.block_tokens)
        if state is not None:
            state.planned_s = plan.total_s
        return plan

    def start_load(self, request_id: str, keys: Sequence[BlockKey], first: int, stop: int,
                   dst_blocks: Sequence[int]) -> Load | None:
        """The `Load` of blocks [first, stop) of `keys` into engine blocks `dst_blocks` (pins them).

        The request's promotions not yet begun are cancelled first (where the byte half can); blocks
        still in flight to host are joined. Returns None when a block is no longer cached (the caller
        recomputes instead).
        """
        with self.lock:
            state = self.queue.pop(request_id, None) or self.running.get(request_id)
            if state is not None:
                state.running = True
                state.started_s = self.clock()
                self.running[request_id] = state
                if not state.planned_s and self.planner is not None:  # not planned through `plan`
                    tiers = [e.best_tier for e in self.index.lookup(state.keys)]
                    state.planned_s = self.planner.plan(tiers[:state.num_tokens // self.spec.block_tokens],
                                                        max(1, state.num_tokens)).total_s
            admission = self.admission
            admission.cancel_request(request_id)
            if stop <= first:
                if state is not None:
                    admission.release(state)
                return None
            entries = self.index.lookup(keys[:stop])[first:]
            if len(entries) < stop - first:
                log.debug("load of %s: blocks [%d, %d) no longer all cached; recomputing", request_id, first, stop)
                if state is not None:
                    admission.release(state)
                return None
            carrying = {e.incoming for e in entries if e.incoming}
            if carrying:  # a running request's blocks are read at its priority, not a promotion's
                admission.cancel_moves(sorted(carrying))
            loaded = [e.key for e in entries]
            self.index.pin(loaded)  # first: staging room below must never evict a block of this load
            tiers, slots = [], []
            out: list[Command] = []
            staged: list[tuple[BlockKey, int]] = []
            after: set[int] = set()
            target = self.prefetch_target
            for entry in entries:
                incoming = admission.incoming_slot(entry) if entry.incoming else None
                if incoming is not None:  # join the promotion in flight: read from host once it lands
                    admission.join(entry, incoming[0])
                    after.add(incoming[0])
                    tiers.append(target)
                    slots.append(incoming[1])
                    continue
                tier = entry.best_tier
                if tier is DISK or tier is REMOTE:
                    if entry.incoming:  # a promotion the load could not join: read twice (never expected)
                        self.stats.double_reads += 1
                    host = HOST
                    slot = self._stage_slot(entry.key, out, request_id)
                    if slot is None:
                        for key, _ in staged:
                            self.tables[host].free(key)
                        self.index.unpin(loaded)
                        self._pre.extend(out)
                        if state is not None:
                            admission.release(state)
                        log.debug("load of %s: no host slot to stage a disk block; recomputing", request_id)
                        return None
                    staged.append((entry.key, slot))  # recorded in host once the read has landed
                    slots.append(slot)
                else:
                    admission.used(entry.key, tier)
                    slots.append(entry.slots[tier])
                tiers.append(tier)
            by_tier = self.stats.hit_blocks_by_tier
            for tier, n in Counter(tiers).items():
                by_tier[str(tier)] = by_tier.get(str(tier), 0) + n
                if tier is not DISK:  # in memory when its load began (or joined on its way there)
                    self.stats.prefetch_ready_blocks += n
            self.index.touch(entries)
            policies = self.policies
            for entry in entries:  # every tier holding a block holds it in its policy (`Books._add`)
                for tier in list(entry.slots):
                    policies[tier].access(entry.key)
            self.stats.restored_blocks += len(loaded)
            self.stats.hit_blocks += len(loaded)
            disk_s = admission.disk_s(len(staged))
            admission.disk_backlog_s += disk_s
            self.stats.disk_load_s += disk_s
            groups, growth = (self.config.num_layer_groups, 1.0) if self.planner is None or state is None else \
                self.planner.layer_groups(tiers, stop * self.spec.block_tokens, state.num_tokens,
                                          self.config.num_layer_groups)
            load = Load(tuple(loaded), tuple(tiers), tuple(slots), tuple(dst_blocks), groups, request_id,
                        after=tuple(sorted(after)), growth=growth)
            self._track(load, lambda c, ks=tuple(loaded), st=tuple(staged), d=disk_s: self._after_load(c, ks, st, d))
            self._pre.extend(out)  # demotions and drops, to run before the load
            return load

    def _stage_slot(self, key: BlockKey, out: list[Command], request_id: str) -> int | None:
        """A host slot to stage a running request's disk block in; queued requests' protections yield
        to it, the last queued first (None: every host block is pinned)."""
        host = HOST
        if host not in self.tables:
            return None
        while True:
            if self._make_room(host, 1, out, request_id):
                slot = self._allocate(host, key)
                if slot is not None:
                    return slot
            if not self.admission.yield_room(reversed(self.queue.values())):
                return None

    def take_prepared(self) -> list[Command]:
        """Commands decided while preparing the last load (to be submitted before it)."""
        out, self._pre = self._pre, []
        return out

    def _after_load(self, completion: Completion, keys: tuple[BlockKey, ...],
                    staged: tuple[tuple[BlockKey, int], ...], disk_s: float) -> list[Command]:
        failed = set(completion.failed)
        for key, slot in staged:
            entry = self.index.get(key)
            if key not in failed and entry is not None:
                self._add(key, HOST, slot, entry.depth, entry.parent)
            elif not self.index.holds(key, HOST):
                self.tables[HOST].free(key)
        self.index.unpin(keys)
        self.admission.disk_backlog_s = max(0.0, self.admission.disk_backlog_s - disk_s)
        state = self.running.get(completion.request_id) if completion.request_id is not None else None
        if state is not None:  # protection ends when the load has finished, not at `finish`
            self.admission.release(state)
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
                slot = self._allocate(tier, key) if self._make_room(tier, 1, out, request_id) > 0 else None
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
        out: list[Command] = []
        below = []  # the disk under write-through; the remote always (it is how replicas share)
        if self.config.write_mode is WriteMode.WRITE_THROUGH and DISK in self.tiers:
            below.append(DISK)
        if REMOTE in self.tiers:
            below.append(REMOTE)
        for dst in below:
            keys, slots = [], []
            for key in completion.ok:
                entry = self.index.get(key)
                if entry is None or dst in entry.slots or tier not in entry.slots:
                    continue
                if self._make_room(dst, 1, out, completion.request_id) <= 0:
                    break
                self._add(key, dst, DISK_SLOT, entry.depth, entry.parent)
                keys.append(key)
                slots.append(entry.slots[tier])
            if keys:
                move = Move(tier, dst, tuple(keys), tuple(slots), (), completion.request_id, MoveReason.WRITE_THROUGH)
                self._track(move, lambda c, d=dst: self._after_write(c, d))
                out.append(move)
        return out

    def _after_write(self, completion: Completion, dst: TierName) -> list[Command]:
        if dst is DISK:
            self.stats.written_to_disk_blocks += len(completion.ok)
        else:
            self.stats.written_to_remote_blocks += len(completion.ok)
        for key in completion.failed:
            if self.index.holds(key, dst):
                self._drop(key, dst)
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
            on_done, pending.on_done = pending.on_done, None  # a callback may hold its pending: no cycle left
            return on_done(completion)

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
                if DISK in self.policies and n < self.disk_slots:
                    self._add(key, DISK, DISK_SLOT)
                    n += 1
            return n
