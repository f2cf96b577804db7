"""Discrete-event simulation of one serving engine driving the real decision half (no bytes).

The simulator is a thin clock around kvtier's own scheduler: the `Decider` (index, slot tables, the
policies of `kvtier.scheduler.policies`, eviction cascade, prefetch and save decisions), the `Planner` and
the `CostModel` are the very objects an `OffloadManager` uses; trace block ids are their keys
(`kvtier.tiers.keys.trace_key`). What is simulated is only what has no bytes here: the byte half
(`SimExecutor`: each command takes the time the cost model gives its link) and the engine's GPU.

Engine model (one instance; state it when quoting numbers):
- requests arrive at their (scaled) trace times and wait in FIFO order; while they wait the decider sees
  them (`enqueue`) and its prefetch decisions run (`next_prefetch`, after every batch of simultaneous
  events, as the real prefetcher wakes on each arrival and completion);
- at most `max_batch` requests run at once (prefilling or decoding); the GPU does one thing at a time:
  a prefill of one request (prefills are serialised, and take priority over decoding when a request waits
  and a batch slot is free, as in vLLM without chunked prefill) or a decode step of every decoding
  request together;
- a prefill follows the planner's plan (`Decider.plan`): the restored blocks [s, r) are one `Load` issued
  at prefill start; the prefill ends at start + max(compute [0, s), load done - start) + compute [r, n),
  so link contention (prefetches, saves, demotions queued on the same link) shows as a longer prefill;
  the first token is produced at its end (TTFT = queueing + prefill);
- after the prefill the engine saves the request's blocks (`Decider.start_save`, every block of the
  prompt, the partial last one included, as the hit-ratio semantics count it); decoding then takes
  `output_tokens - 1` steps of `CostModel.decode_step_s(batch, mean context)` each;
- links (`links.SimExecutor`): gpu, h2d, d2h, disk-read, disk-write, each serving a running request's
  loads and saves ahead of demotions and write-through, and those ahead of promotions (background work in
  pieces of a few blocks, so a load waits behind one piece at most); a promotion whose request starts or
  leaves has its pieces not yet begun cancelled, and a load that needs a block still being promoted joins
  that move (`Load.after`) instead of reading it again;
- the decider's clock is the simulated one (its prefetch admission predicts start times with it).

Invariants: TTFT >= the plan's predicted prefill (contention only adds); every command yields exactly one
`Completion` fed back to `Decider.complete` at its simulated end; the bytes counted per link are the
bytes of the commands the decider issued; nothing here imports torch.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kvtier.tiers.commands import Command, Completion, Load, Move, MoveReason
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.tier import TierName

from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.planner import Planner
from kvtier.scheduler.replay.links import LINKS, SimCounters, SimExecutor  # noqa: F401 (re-exported)

#: `TierName.rank` -> the tier's name (the counters' keys)
_TIER_NAMES = tuple(t.value for t in sorted(TierName, key=lambda t: t.rank))

#: progress(done, total, label)
Progress = Callable[[int, int, str], None]

LINKS = ("gpu", "h2d", "d2h", "disk-read", "disk-write", "net-read", "net-write")

_ARRIVAL, _COMPLETE, _PREFILL_DONE, _DECODE_DONE, _LINK = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request as the simulator sees it.

    Attributes:
        arrival_s: arrival time (already scaled).
        keys: the prompt's block keys in order (the partial last block included).
        weights: tokens of each block.
        num_tokens: prompt tokens n.
        output_tokens: tokens generated (the first at the end of the prefill).
    """

    arrival_s: float
    keys: tuple[BlockKey, ...]
    weights: tuple[int, ...]
    num_tokens: int
    output_tokens: int


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (times in seconds)."""

    arrival_s: float
    start_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    planned_s: float = 0.0
    no_cache_s: float = 0.0
    hit_blocks: int = 0
    hit_tokens: int = 0
    restored_blocks: int = 0
    decision: str = "none-cached"

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s


@dataclass(slots=True)
class _Running:
    index: int
    remaining: int
    context: int


class EngineSim:
    """One engine instance driving a `Decider` (or no cache at all) through a trace.

    Args:
        requests: the requests, in arrival order.
        cost_model: the model and machine (block_tokens = the keys' block size).
        decider: the decision half (None: the no-cache baseline, every prompt computed).
        max_batch: requests running at once (prefilling or decoding).
        progress: called now and then with (requests done, total, label).
    """

    def __init__(self, requests: Sequence[SimRequest], cost_model: CostModel, decider: object | None,
                 max_batch: int = 16, progress: Progress | None = None) -> None:
        self.requests = requests
        self.cost_model = cost_model
        self.decider = decider
        self.planner = decider.planner if decider is not None else Planner(cost_model)
        self.max_batch = max_batch
        self.progress = progress
        self.block_tokens = cost_model.spec.block_tokens
        self.counters = SimCounters()
        self.executor = SimExecutor(cost_model, cost_model.spec.bytes_per_block, self.counters,
                                    lambda t, link: self._push(t, _LINK, link), self._background_done)
        self.now = 0.0
        if decider is not None:
            decider.clock = lambda: self.now
            decider.set_canceller(lambda command_id: self.executor.cancel(command_id, self.now))
        self.records = [RequestRecord(r.arrival_s) for r in requests]
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._waiting: list[int] = []  # FIFO of request indices (a list with a moving head)
        self._head = 0
        self._decoding: list[_Running] = []
        self._gpu_busy = False
        self._next_arrival = 0
        self._prefetch_dirty = False
        self._decode_cache: dict[tuple[int, int], float] = {}
        self.num_finished = 0

    # -- events -------------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def _submit(self, commands: Sequence[Command], now: float) -> float:
        """Schedules commands in order; returns the latest completion time."""
        end = now
        pending = self.decider.pending if self.decider is not None else {}
        submit, events, push = self.executor.submit, self._events, heapq.heappush
        for command in commands:
            done = submit(command, now)
            if done is None:  # background: `_background_done` reports it
                continue
            if done > end:
                end = done
            if command.command_id in pending:
                self._seq += 1
                push(events, (done, self._seq, _COMPLETE, (command, command.keys)))
        return end

    def _background_done(self, command: Command, ok: tuple, t: float) -> None:
        if self.decider is not None and command.command_id in self.decider.pending:
            self._push(t, _COMPLETE, (command, ok))

    def run(self) -> list[RequestRecord]:
        """Runs the whole trace; returns one record per request."""
        requests, events = self.requests, self._events
        total = len(requests)
        decider = self.decider
        report_every = max(1, total // 100)
        last_report = 0
        while self._next_arrival < total or events:
            if self._next_arrival < total and (not events or requests[self._next_arrival].arrival_s <= events[0][0]):
                i = self._next_arrival
                self._next_arrival += 1
                t = self.now = requests[i].arrival_s
                self._arrive(i, t)
            else:
                t, _, kind, payload = heapq.heappop(events)
                self.now = t
                if kind == _LINK:
                    self.executor.wake(payload, t)
                elif kind == _COMPLETE:
                    command, ok = payload
                    follow = decider.complete(Completion(command.command_id, command.request_id, ok))
                    if follow:
                        self._submit(follow, t)
                    # only a landed promotion or load can give the prefetcher new work (it frees budget or
                    # stages blocks in host); saves and write-throughs land in tiers it does not promote from
                    if type(command) is Load or (type(command) is Move and command.reason is MoveReason.PREFETCH):
                        self._prefetch_dirty = True
                elif kind == _PREFILL_DONE:
                    self._prefill_done(payload, t)
                else:
                    self._decode_done(payload, t)
                if self.progress is not None and self.num_finished - last_report >= report_every:
                    last_report = self.num_finished
                    self.progress(last_report, total, "requests")
            if self._prefetch_dirty and decider is not None and not self._more_at(t):
                self._prefetch_dirty = False
                commands = decider.next_prefetch()
                if commands:
                    self._submit(commands, t)
            if not self._gpu_busy and not self._more_at(t):
                self._schedule_gpu(t)
        if self.progress is not None:
            self.progress(total, total, "requests")
        return self.records

    def _more_at(self, t: float) -> bool:
        """Whether another event or arrival is due at this very time (batch them first)."""
        if self._events and self._events[0][0] <= t:
            return True
        return self._next_arrival < len(self.requests) and self.requests[self._next_arrival].arrival_s <= t

    def _arrive(self, i: int, t: float) -> None:
        request = self.requests[i]
        self._waiting.append(i)
        if self.decider is not None:
            self.decider.enqueue(str(i), request.keys, request.num_tokens)
            self._prefetch_dirty = True

    # -- the GPU --------------------------------------------------------------------------------------

    def _schedule_gpu(self, t: float) -> None:
        if self._head < len(self._waiting) and len(self._decoding) < self.max_batch:
            i = self._waiting[self._head]
            self._head += 1
            if self._head > 4096 and self._head * 2 > len(self._waiting):
                del self._waiting[:self._head]
                self._head = 0
            self._gpu_busy = True
            self._push(self._start_prefill(i, t), _PREFILL_DONE, i)
            self._prefetch_dirty = True  # the look-ahead window moved on by one request
        elif self._decoding:
            self._gpu_busy = True
            batch = self._decoding
            steps = min(r.remaining for r in batch)
            context = sum(r.context for r in batch) // len(batch)
            step_s = self._decode_step_s(len(batch), context)
            if len(batch) < self.max_batch and self._next_arrival < len(self.requests):
                # stop at the first step boundary after the next arrival, which will want a prefill
                wait = self.requests[self._next_arrival].arrival_s - t
                steps = max(1, min(steps, math.ceil(wait / step_s)))
            self._push(t + steps * step_s, _DECODE_DONE, steps)
            self.counters.gpu_busy_s += steps * step_s
            self.counters.decode_steps += steps

    def _decode_step_s(self, batch: int, context: int) -> float:
        bucket = (batch, context >> 6)  # context in 64-token buckets: a cache, not a model change
        step = self._decode_cache.get(bucket)
        if step is None:
            step = self._decode_cache[bucket] = self.cost_model.decode_step_s(batch, (bucket[1] << 6) + 32)
        return step

    def _start_prefill(self, i: int, t: float) -> float:
        request, record = self.requests[i], self.records[i]
        record.start_s = t
        counters = self.counters
        keys, n, bt = request.keys, request.num_tokens, self.block_tokens
        counters.blocks += len(keys)
        counters.tokens += sum(request.weights)
        decider = self.decider
        if decider is None:
            plan = self.planner.plan((), n)
            record.planned_s = record.no_cache_s = plan.total_s
            counters.decisions["none-cached"] += 1
            counters.gpu_busy_s += plan.total_s
            return t + plan.total_s
        rid = str(i)
        # one walk of the prefix: the tier code of each cached block, for the counters and the planner
        # (`Decider.plan(rid, keys[:full], n)` is this plan: its own walk stops at `full` blocks)
        codes = decider.lookup_codes(keys)
        if len(codes):
            weights = request.weights
            by_blocks, by_tokens = counters.hit_blocks_by_tier, counters.hit_tokens_by_tier
            for j, code in enumerate(codes.tolist()):
                tier = _TIER_NAMES[code]
                by_blocks[tier] += 1
                by_tokens[tier] += weights[j]
            record.hit_blocks = len(codes)
            record.hit_tokens = sum(weights[:len(codes)])
        full = min(len(keys), n // bt)  # the planner matches whole blocks only
        plan = decider.planner.plan(codes[:full], n)
        record.planned_s = plan.total_s
        record.no_cache_s = plan.recompute_all_s
        s, r, k = plan.split, plan.restore_stop, plan.num_matched_blocks
        load = decider.start_load(rid, keys, s, r, range(s, r)) if r > s else None
        if r <= s:
            decider.start_load(rid, keys, 0, 0, ())  # marks the request running
        pre = decider.take_prepared()
        if pre:
            self._submit(pre, t)
        if k == 0:
            decision = "none-cached"
        elif r == 0:
            decision = "recompute"
        elif load is None:
            decision = "fallback-recompute"
        elif s == 0 and r == k:
            decision = "restore"
        else:
            decision = "split"
        record.decision = decision
        counters.decisions[decision] += 1
        if load is None:
            duration = plan.recompute_all_s
        else:
            record.restored_blocks = r - s
            load_done = self._submit((load,), t)
            duration = max(plan.front_compute_s, load_done - t) + plan.suffix_compute_s
        counters.gpu_busy_s += duration
        return t + duration

    def _prefill_done(self, i: int, t: float) -> None:
        request, record = self.requests[i], self.records[i]
        record.first_token_s = t
        self._gpu_busy = False
        decider = self.decider
        if decider is not None:
            commands = decider.start_save(str(i), request.keys, range(len(request.keys)))
            if commands:
                self._submit(commands, t)
                self._prefetch_dirty = True  # demotions may have moved queued requests' blocks down
        if request.output_tokens > 1:
            self._decoding.append(_Running(i, request.output_tokens - 1, request.num_tokens + 1))
        else:
            self._finish(i, t)

    def _decode_done(self, steps: int, t: float) -> None:
        self._gpu_busy = False
        still: list[_Running] = []
        for running in self._decoding:
            running.remaining -= steps
            running.context += steps
            if running.remaining <= 0:
                self._finish(running.index, t)
            else:
                still.append(running)
        self._decoding = still

    def _finish(self, i: int, t: float) -> None:
        self.records[i].finish_s = t
        self.num_finished += 1
        if self.decider is not None:
            self.decider.finish(str(i))
