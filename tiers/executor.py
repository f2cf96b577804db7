"""Executor: the byte half. Runs the decision half's commands on the tiers and reports completions.

Primitives: `Executor(tiers)`, `submit(command, buffer=None) -> TransferHandle`, `cancel(command_id)`
(a promotion's reads not yet begun), `completions()` (drains the outcomes finished since the last call),
`close()`.

Invariants:
- commands run in the order they were submitted within a priority (a demotion out of a slot runs
  before a later save into it); loads for running requests go before prefetches, saves last; a load
  that joined a promotion (`Load.after`) starts once that move has completed;
- every command yields exactly one `Completion`, failures included (a corrupt disk value is a failed
  key, never delivered), so the decision half's books always converge.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Mapping

from kvtier.tiers.commands import Command, Completion, Evict, Load, Move, Save
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import Tier, TierName
from kvtier.tiers.kvbuffer import KVBuffer
from kvtier.tiers.transfer import Transferer
from kvtier.tiers.worker import PRIORITY_LOAD, PRIORITY_PREFETCH, PRIORITY_SAVE, TransferHandle

log = logging.getLogger(__name__)


class Executor:
    """Executes commands against this process's tiers."""

    #: moves out of the disk remembered for joins and cancellation
    KEPT_MOVES = 4096

    def __init__(self, tiers: Mapping[TierName, Tier],
                 on_complete: Callable[[Completion], None] | None = None) -> None:
        """Args:
            tiers: this process's tiers by name.
            on_complete: called (on a worker thread) with each completion; without it completions
                queue up for `completions()`.
        """
        self.tiers = {TierName(k): v for k, v in tiers.items()}
        self.transfer = Transferer(self.tiers)
        self.on_complete = on_complete
        self._done: list[Completion] = []
        self._lock = threading.Lock()
        #: recent moves out of the disk by command id (done ones too: a load decided to join a move may
        #: be submitted after it completed, and must still see which blocks it failed)
        self._moves: OrderedDict[int, TransferHandle] = OrderedDict()

    def submit(self, command: Command, buffer: KVBuffer | None = None, priority: int | None = None) -> TransferHandle:
        """Starts one command; its completion is queued for `completions()` when it ends.

        Args:
            command: what to do.
            buffer: the engine's KV memory (for `Load` and `Save`).
            priority: overrides the default (loads and saves of a running request: load priority;
                moves: prefetch priority; write-through to disk: save priority).
        """
        if isinstance(command, Move):
            default = PRIORITY_SAVE if command.dst is TierName.DISK else PRIORITY_PREFETCH
            handle = self.transfer.move(command.src, command.dst, command.keys, command.src_slots, command.dst_slots,
                                        priority=default if priority is None else priority,
                                        description=f"{command.reason} {command.src}->{command.dst} x{len(command.keys)}")
            if command.src is TierName.DISK:  # a load may join it, or its request cancel it
                with self._lock:
                    self._moves[command.command_id] = handle
                    while len(self._moves) > self.KEPT_MOVES:
                        self._moves.popitem(last=False)
        elif isinstance(command, Load):
            self._need(buffer, command)
            with self._lock:
                joined = [h for c in command.after if (h := self._moves.get(c)) is not None]
            handle = self.transfer.load(command.keys, command.src_tiers, command.src_slots, buffer,
                                        command.dst_blocks, num_groups=command.num_groups, growth=command.growth,
                                        priority=PRIORITY_LOAD if priority is None else priority,
                                        description=f"load {command.request_id} x{len(command.keys)}",
                                        wait_for=joined)
        elif isinstance(command, Save):
            self._need(buffer, command)
            handle = self.transfer.save(buffer, command.src_blocks, command.keys, command.dst, command.dst_slots,
                                        priority=PRIORITY_LOAD if priority is None else priority)
        elif isinstance(command, Evict):
            handle = TransferHandle(command.keys)
            failed = []
            if command.tier is TierName.DISK and TierName.DISK in self.tiers:
                for key in command.keys:
                    try:
                        self.tiers[TierName.DISK].delete(key)
                    except Exception as err:  # a failed delete leaves a stale value: harmless, checked on read
                        log.warning("disk delete failed: %s", err)
                        failed.append(key)
            handle.finish(failed)
        else:
            raise ConfigError(f"unknown command {type(command).__name__}")
        handle.add_done_callback(lambda h, c=command: self._record(c, h))
        return handle

    def cancel(self, command_id: int) -> tuple:
        """Cancels the not-yet-begun reads of a move out of the disk; returns the keys cancelled."""
        with self._lock:
            handle = self._moves.get(command_id)
        return self.transfer.cancel(handle) if handle is not None else ()

    @staticmethod
    def _need(buffer: KVBuffer | None, command: Command) -> None:
        if buffer is None:
            raise ConfigError(f"{type(command).__name__} of request {command.request_id}: needs the engine's KV buffer")

    def _record(self, command: Command, handle: TransferHandle) -> None:
        failed = set(handle.failed)
        ok = tuple(k for k in command.keys if k not in failed)
        error = None if handle.error is None else f"{type(handle.error).__name__}: {handle.error}"
        completion = Completion(command.command_id, command.request_id, ok, tuple(handle.failed), error)
        if self.on_complete is not None:
            self.on_complete(completion)
            return
        with self._lock:
            self._done.append(completion)

    def reopen_disk(self, evict: bool = True, timeout_s: float = 60.0) -> int:
        """Closes the disk tier once queued work has run, optionally drops its file from the page cache
        (a cold restore next, as benchmarks need), and reopens it. Returns the bytes still cached."""
        from kvtier.tiers.coldcache import evict_file

        disk = self.tiers.get(TierName.DISK)
        if disk is None:
            return 0
        self.transfer.drain(timeout_s)
        data_file = disk.data_file
        disk.close()
        left = evict_file(data_file) if evict else 0
        fresh = disk.reopen()
        self.tiers[TierName.DISK] = self.transfer.tiers[TierName.DISK] = fresh
        return left

    def completions(self) -> list[Completion]:
        """The completions that arrived since the last call."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Finishes queued work, joins the workers and closes the tiers (idempotent)."""
        self.transfer.close()
        for tier in self.tiers.values():
            tier.close()
