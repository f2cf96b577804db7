"""The simulator's byte half: links with priorities, served in simulated time (no bytes).

Links: gpu (device copies), h2d and d2h (the host link, one per direction), disk-read and disk-write
(separate queues, as the real executor's disk reader and writer), net-read and net-write (the remote
tier's network: the cost model's remote path). Each command occupies its link for
the cost model's time of its path (`PathCost.time_s`: the gpu, host or disk path; a disk write is
charged as a disk read of the same bytes). A `Load` uses its links in parallel (the planner's load
model: a disk block occupies the disk and the host link); an `Evict` takes no time.

Priorities, as in the real byte half (`tiers/worker.py`): class 0, a running request's loads and saves,
is served FIFO ahead of everything queued; class 1, demotions and write-through; class 2, promotions.
Class 0 work is never preempted but takes the link as soon as the piece being served ends; background
work (classes 1 and 2) is served in pieces of `PIECE_BLOCKS` blocks (the real disk reader's batch), so a
load waits behind at most one piece. Hence a class-0 command's end is known when it is submitted
(`submit` returns it) and a background command's only when its last piece starts (its completion is
reported through `on_complete`).

Cancellation (`cancel(command_id)`): the blocks of a background move whose piece has not started are
cancelled and returned; what was read completes as usual. Joins: a `Load` with `after` ends no earlier
than those moves (whose remaining pieces the decider has cancelled, so their end is known).

Invariants: every non-cancelled block of a command is served exactly once and counted once in
`bytes_by_link` / `busy_s_by_link`; a link serves one piece at a time; `double_reads` counts blocks a
load read from disk while a promotion of the same block was queued or in flight (the decision half's
join makes it 0).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

from kvtier.tiers.commands import Command, Evict, Load, Move, MoveReason, Save
from kvtier.tiers.keys import BlockKey
from kvtier.tiers.tier import DISK, GPU, REMOTE

from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.cost.parts import PathCost

LINKS = ("gpu", "h2d", "d2h", "disk-read", "disk-write", "net-read", "net-write")
_TIERS = ("gpu", "host", "disk", "remote")
#: blocks a background job is served in at a time (the real disk reader's batch, `Transferer.DISK_LOAD_BATCH`)
PIECE_BLOCKS = 4
#: priority class of each move reason (lower first); loads and saves are class 0
MOVE_CLASS = {MoveReason.DEMOTE: 1, MoveReason.WRITE_THROUGH: 1, MoveReason.MOVE: 1, MoveReason.PREFETCH: 2}

#: on_complete(command, ok_keys, time)
OnComplete = Callable[[Command, tuple, float], None]
#: schedule(time, link name): call `wake(link name, time)` at that time
Schedule = Callable[[float, str], None]


@dataclass(slots=True)
class SimCounters:
    """Totals of one run."""

    blocks: int = 0
    tokens: int = 0
    hit_blocks_by_tier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TIERS, 0))
    hit_tokens_by_tier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TIERS, 0))
    decisions: dict[str, int] = field(default_factory=lambda: {
        "none-cached": 0, "restore": 0, "recompute": 0, "split": 0, "fallback-recompute": 0})
    bytes_by_link: dict[str, int] = field(default_factory=lambda: {link: 0 for link in LINKS})
    busy_s_by_link: dict[str, float] = field(default_factory=lambda: {link: 0.0 for link in LINKS})
    commands: dict[str, int] = field(default_factory=lambda: {"Move": 0, "Load": 0, "Save": 0, "Evict": 0})
    bytes_by_reason: dict[str, int] = field(default_factory=dict)
    busy_s_by_reason: dict[str, float] = field(default_factory=dict)
    gpu_busy_s: float = 0.0
    decode_steps: int = 0
    double_reads: int = 0


@dataclass(slots=True)
class _Job:
    """A background move on one link."""

    command: Move
    link: str
    klass: int
    left: list[BlockKey]
    started: bool = False
    end_s: float = -1.0  # known once the last piece is in service (or the job is over)
    done: bool = False
    cancelled: set = field(default_factory=set)


@dataclass(slots=True)
class _Link:
    latency_s: float
    block_s: float
    ramp: PathCost | None  # the path, when it has a ramp (a calibrated cold disk): time not linear in blocks
    queue: list = field(default_factory=list)  # (class, seq, job), lazy deletion of finished jobs
    top_free_at: float = 0.0  # when the class-0 work committed so far ends
    current: _Job | None = None
    piece_end: float = 0.0
    wake_at: float = -1.0


class SimExecutor:
    """Commands in simulated time (module docstring).

    Args:
        cost_model: the model and machine (its paths give each link's time).
        bytes_per_block: bytes a block moves.
        counters: where bytes, busy time and double reads are added.
        schedule: asks the engine to call `wake(link, t)` at time t.
        on_complete: told when a background command ends, with the keys it delivered.
    """

    def __init__(self, cost_model: CostModel, bytes_per_block: int, counters: SimCounters,
                 schedule: Schedule, on_complete: OnComplete) -> None:
        self.bytes_per_block = bytes_per_block
        self.counters = counters
        self.schedule = schedule
        self.on_complete = on_complete
        paths = {name: cost_model.path(name) for name in ("gpu", "host", "disk")}
        net = cost_model.paths.get("remote", paths["disk"])  # the remote tier's network
        by_link = {"gpu": paths["gpu"], "h2d": paths["host"], "d2h": paths["host"],
                   "disk-read": paths["disk"], "disk-write": paths["disk"], "net-read": net, "net-write": net}
        self.links = {name: _Link(cost.latency_s, cost.block_s, cost if cost.ramp_blocks else None) for name, cost in by_link.items()}
        self.jobs: dict[int, _Job] = {}
        self._seq = itertools.count()
        self._promoting: dict[BlockKey, int] = {}  # keys of promotions not completed -> how many

    def _account(self, link: str, num_blocks: int, duration: float, reason: object) -> None:
        c = self.counters
        reason = str(reason)
        moved = num_blocks * self.bytes_per_block
        c.bytes_by_link[link] += moved
        c.busy_s_by_link[link] += duration
        c.bytes_by_reason[reason] = c.bytes_by_reason.get(reason, 0) + moved
        c.busy_s_by_reason[reason] = c.busy_s_by_reason.get(reason, 0.0) + duration

    def _foreground(self, name: str, num_blocks: int, now: float, reason: str) -> float:
        """Class-0 work: FIFO after the piece in service and the class-0 work already committed."""
        if num_blocks <= 0:
            return now
        link = self.links[name]
        duration = (link.latency_s + num_blocks * link.block_s if link.ramp is None
                    else link.ramp.time_s(num_blocks))
        start = max(now, link.top_free_at, link.piece_end if link.current is not None else now)
        link.top_free_at = start + duration
        self._account(name, num_blocks, duration, reason)
        return start + duration

    def submit(self, command: Command, now: float) -> float | None:
        """Schedules one command; returns when it completes, or None for a background move (its
        completion comes through `on_complete`)."""
        kind = type(command)
        self.counters.commands[kind.__name__] += 1
        if kind is Move:
            if command.dst is DISK:
                name = "disk-write"
            elif command.dst is REMOTE:
                name = "net-write"
            elif command.src is DISK:
                name = "disk-read"
            elif command.src is REMOTE:
                name = "net-read"
            elif command.dst is GPU:
                name = "h2d"
            elif command.src is GPU:
                name = "d2h"
            else:
                name = "gpu"  # host -> host does not happen
            job = _Job(command, name, MOVE_CLASS.get(command.reason, 1), list(command.keys))
            if not job.left:
                return now
            self.jobs[command.command_id] = job
            if command.reason is MoveReason.PREFETCH:
                for key in job.left:
                    self._promoting[key] = self._promoting.get(key, 0) + 1
            heapq.heappush(self.links[name].queue, (job.klass, next(self._seq), job))
            self._kick(name, now)
            return None
        if kind is Load:
            tiers = command.src_tiers
            n_gpu = tiers.count(GPU)
            n_disk = tiers.count(DISK)
            n_remote = tiers.count(REMOTE)
            n_host = len(tiers) - n_gpu - n_disk - n_remote
            if n_disk and self._promoting:
                self.counters.double_reads += sum(1 for k, t in zip(command.keys, tiers)
                                                  if t is DISK and k in self._promoting)
            end = max(self._foreground("gpu", n_gpu, now, "load"),
                      self._foreground("h2d", n_host + n_disk + n_remote, now, "load"),
                      self._foreground("disk-read", n_disk, now, "load"),
                      self._foreground("net-read", n_remote, now, "load"))
            for cid in command.after:  # joined promotions: their remaining pieces were cancelled
                job = self.jobs.get(cid)
                if job is not None and not job.done:
                    assert job.end_s >= 0, f"load {command.command_id} joins move {cid} of unknown end"
                    end = max(end, job.end_s)
            return end
        if kind is Save:
            return self._foreground("gpu" if command.dst is GPU else "d2h", len(command.keys), now, "save")
        assert kind is Evict, f"unknown command {command!r}"
        return now

    def _kick(self, name: str, now: float) -> None:
        """Starts the next background piece on an idle link (or asks to be woken when it frees)."""
        link = self.links[name]
        if link.current is not None:
            return
        if link.top_free_at > now:
            if link.wake_at != link.top_free_at:
                link.wake_at = link.top_free_at
                self.schedule(link.top_free_at, name)
            return
        while link.queue:
            job = link.queue[0][2]
            if job.left:
                break
            heapq.heappop(link.queue)
        else:
            return
        piece, job.left = job.left[:PIECE_BLOCKS], job.left[PIECE_BLOCKS:]
        per_block = link.block_s
        if link.ramp is not None:  # a piece's share of its whole move's time at the path's ramp
            per_block *= link.ramp.effective_blocks(len(job.command.keys)) / len(job.command.keys)
        duration = (0.0 if job.started else link.latency_s) + len(piece) * per_block
        job.started = True
        link.current, link.piece_end = job, now + duration
        if not job.left:
            heapq.heappop(link.queue)
            job.end_s = link.piece_end
        self._account(name, len(piece), duration, job.command.reason)
        self.schedule(link.piece_end, name)

    def wake(self, name: str, now: float) -> None:
        """A piece ended or the class-0 work finished on this link."""
        link = self.links[name]
        if link.current is not None and link.piece_end <= now:
            job, link.current = link.current, None
            if not job.left:
                self._finish(job, now)
        self._kick(name, now)

    def _finish(self, job: _Job, now: float) -> None:
        job.done = True
        job.end_s = now
        command = job.command
        self.jobs.pop(command.command_id, None)
        ok = tuple(k for k in command.keys if k not in job.cancelled) if job.cancelled else command.keys
        if command.reason is MoveReason.PREFETCH:
            for key in ok:
                self._forget_promoting(key)
        self.on_complete(command, ok, now)

    def _forget_promoting(self, key: BlockKey) -> None:
        count = self._promoting.get(key, 0)
        if count > 1:
            self._promoting[key] = count - 1
        elif count:
            del self._promoting[key]

    def cancel(self, command_id: int, now: float) -> list[BlockKey]:
        """Cancels the blocks of a background move whose piece has not started; returns them. A move
        with nothing read yet is gone (no completion); one between pieces completes now with what it
        read; one whose piece is being read completes when that piece ends."""
        job = self.jobs.get(command_id)
        if job is None or job.done or not job.left:
            return []
        cancelled, job.left = job.left, []
        job.cancelled.update(cancelled)
        if job.command.reason is MoveReason.PREFETCH:
            for key in cancelled:
                self._forget_promoting(key)
        link = self.links[job.link]
        if link.current is job:
            job.end_s = link.piece_end
        elif not job.started:
            job.done = True
            self.jobs.pop(command_id, None)
        else:
            self._finish(job, now)
        return cancelled
