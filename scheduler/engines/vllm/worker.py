"""The worker side of kvtier's vLLM connector: the byte half in vLLM's worker process.

Primitives: `WorkerSide(spec, config)`: `register(buffer)` (builds the host pool, the disk store and the
`Executor` once vLLM's paged KV is known), `start_step(meta)` (submits the step's loads and moves),
`wait_layer(name)` (waits for that layer of this step's loads only), `end_step(meta)` (runs the
step's saves to completion, collects load failures), `take_load_errors()`, `take_completions()`,
`close()`.

Invariants:
- commands run on the executor's FIFO copy worker in the order the scheduler decided them; saves are
  submitted after the forward (they read what it computed) and waited for before the step ends, so
  vLLM may free or reuse those blocks as soon as the request finishes;
- a load's failed blocks (missing, corrupt or foreign on disk; a timed-out wait) are reported by vLLM
  block id, from the first failed block of the load to its end (vLLM recomputes from there); their
  keys come back in the load's `Completion` and the scheduler drops them from its books.
"""

from __future__ import annotations

import logging
from typing import Any

from kvtier.tiers.commands import Completion, Load, Save
from kvtier.tiers.errors import TransferTimeout
from kvtier.tiers.executor import Executor
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.worker import TransferHandle

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.manager import build_tiers
from kvtier.scheduler.engines.vllm.buffer import VllmKVBuffer

log = logging.getLogger(__name__)


class WorkerSide:
    """The byte half of the connector (see the module docstring)."""

    def __init__(self, spec: KVSpec, config: OffloadConfig) -> None:
        self.spec = spec
        self.config = config
        self.buffer: VllmKVBuffer | None = None
        self.executor: Executor | None = None
        self.loads: list[tuple[Load, TransferHandle]] = []
        self.load_errors: set[int] = set()
        self.timeout_s = config.load_timeout_s

    def register(self, buffer: VllmKVBuffer) -> None:
        """Binds vLLM's paged KV; allocates the host pool and opens the disk store."""
        self.buffer = buffer
        self.executor = Executor(build_tiers(self.spec, self.config))
        log.info("kvtier worker: %d vLLM blocks bound; tiers %s", buffer.num_blocks,
                 ", ".join(str(t) for t in self.executor.tiers))

    def start_step(self, meta: Any) -> None:
        """Submits this step's loads, promotions, write-through and evictions (in decision order)."""
        if self.executor is None:
            return
        if meta.cold_reset:
            self._cold_reopen()
        self.load_errors.update(meta.failed_blocks)
        for command in meta.before:
            handle = self.executor.submit(command, self.buffer)
            if isinstance(command, Load):
                self.loads.append((command, handle))

    def wait_layer(self, layer_name: str) -> None:
        """Blocks until this step's loads have put `layer_name`'s KV in place (with a timeout)."""
        if not self.loads or self.buffer is None:
            return
        layer = self.buffer.layer_index.get(layer_name)
        if layer is None:
            return
        for load, handle in self.loads:
            if not handle.layer_ready(layer):
                try:
                    handle.wait_layer(layer, self.timeout_s)
                except TransferTimeout:
                    log.warning("load of %s: layer %d not in place after %.1f s; recomputing its blocks",
                                load.request_id, layer, self.timeout_s)
                    self.load_errors.update(load.dst_blocks)

    def end_step(self, meta: Any) -> None:
        """Runs this step's saves to completion; collects the step's load failures."""
        if self.executor is None:
            return
        if meta is not None and meta.after:
            handles = [(c, self.executor.submit(c, self.buffer)) for c in meta.after]
            for command, handle in handles:
                if isinstance(command, Save):
                    try:
                        handle.wait(self.timeout_s)
                    except TransferTimeout:
                        log.warning("save of %s not done after %.1f s", command.request_id, self.timeout_s)
        loads, self.loads = self.loads, []
        for load, handle in loads:
            try:
                handle.wait(self.timeout_s)
            except TransferTimeout:
                self.load_errors.update(load.dst_blocks)
                continue
            failed = set(handle.failed)
            if handle.error is not None:
                failed = set(load.keys)
            first_bad = next((i for i, k in enumerate(load.keys) if k in failed), None)
            if first_bad is not None:
                self.load_errors.update(load.dst_blocks[first_bad:])
                log.info("load of %s: %d of %d blocks failed their checks; vLLM recomputes them",
                         load.request_id, len(load.keys) - first_bad, len(load.keys))

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def take_completions(self) -> list[Completion]:
        return self.executor.completions() if self.executor is not None else []

    def _cold_reopen(self) -> None:
        """Closes the disk store, drops its pages from the page cache, reopens it (a cold restore next)."""
        if self.executor is None:
            return
        left = self.executor.reopen_disk(evict=True, timeout_s=self.timeout_s)
        log.info("kvtier worker: disk store reopened cold (%d bytes still resident)", left)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None
