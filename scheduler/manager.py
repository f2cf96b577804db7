"""OffloadManager: the facade an engine calls.

    manager = OffloadManager(spec, OffloadConfig(host_bytes="8GiB", disk_bytes="100GiB", disk_path="/nvme/kv"))
    manager.enqueue(rid, token_ids)              # queued: prefetch starts in the background
    plan = manager.plan(rid)                     # restore vs recompute, per block range
    loading = manager.load(rid, kv_buffer, plan) # batched, layer-wise; engine waits per layer
    ... engine computes [0, s) while [s, r) loads, then the suffix, waiting with loading.wait_layer(i) ...
    manager.store(rid, token_ids, kv_buffer)     # async save of the new full blocks
    manager.finish(rid)

It holds both halves in one process (docs/design.md "Two halves"): the `Decider` (books and decisions)
and the `Executor` (tiers and copies). Every engine event becomes commands from the decider, which
the executor runs; completions flow back to the decider, which may answer with follow-ups (a
write-through to disk). A vLLM connector holds the same two halves on its two sides instead.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any, Sequence

from kvtier.tiers.commands import Command, Completion, Save
from kvtier.tiers.errors import ClosedError, ConfigError, TransferTimeout
from kvtier.tiers.executor import Executor
from kvtier.tiers.keys import BlockKey, KeyChain
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import Tier, TierName
from kvtier.tiers.kvbuffer import KVBuffer
from kvtier.tiers.worker import TransferHandle

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.decider import Decider
from kvtier.scheduler.plan import Plan
from kvtier.scheduler.policies import RetentionHint
from kvtier.scheduler.prefetcher import Prefetcher

log = logging.getLogger(__name__)


class Loading:
    """A load in flight: the plan it follows and the handle the engine waits on, layer by layer.

    Attributes:
        plan: the plan (blocks [plan.split, restore_stop) are restored; the rest are the engine's).
        handle: the transfer (None when nothing is restored).
        restore_start, restore_stop: the blocks actually restored (restore_stop may be below the plan's
            when a block vanished before the load started: the engine recomputes from there).
    """

    def __init__(self, plan: Plan, handle: TransferHandle | None, restore_start: int, restore_stop: int,
                 stall: list[float], timeout_s: float) -> None:
        self.plan = plan
        self.handle = handle
        self.restore_start = restore_start
        self.restore_stop = restore_stop
        self._stall = stall
        self._timeout_s = timeout_s

    @property
    def num_restored_blocks(self) -> int:
        return self.restore_stop - self.restore_start

    def wait_layer(self, layer: int) -> None:
        """Blocks until `layer`'s restored KV is in place (counts the wait as stall time)."""
        if self.handle is None or self.handle.layer_ready(layer):
            return
        start = time.perf_counter()
        try:
            self.handle.wait_layer(layer, self._timeout_s)
        finally:
            self._stall[0] += time.perf_counter() - start

    def wait(self) -> int:
        """Waits for the whole load; returns the number of leading restored blocks that arrived intact
        (the engine recomputes from `restore_start + that`)."""
        if self.handle is None:
            return 0
        start = time.perf_counter()
        try:
            self.handle.wait(self._timeout_s)
        finally:
            self._stall[0] += time.perf_counter() - start
        failed = set(self.handle.failed)
        return next((i for i, k in enumerate(self.handle.keys) if k in failed), len(self.handle.keys))


class OffloadManager:
    """Tiered KV offload for one model: lookup, plan, load, store, prefetch.

    Args:
        spec: the model's KV geometry and identity (its fingerprint namespaces every key).
        config: capacities, paths, policy, prefetch (an `OffloadConfig`).
        cost_model: predicts restore and recompute times; default: from `config.hardware` and the
            model's config.
        model_config: the model's HF config dict (FLOP counts), when the spec is not a preset's.
        tiers: prebuilt tiers by name (tests and benchmarks); built from `config` when None.
    """

    def __init__(self, spec: KVSpec, config: OffloadConfig | None = None, *, cost_model: Any = None,
                 model_config: Any = None, tiers: dict[TierName, Tier] | None = None) -> None:
        from kvtier.scheduler.planner import Planner

        self.spec = spec
        self.config = config = config or OffloadConfig()
        self.keychain = KeyChain.for_spec(spec, config.salt)
        self.cost_model = cost_model or default_cost_model(spec, config.hardware, model_config)
        self.decider = Decider(spec, config, Planner(self.cost_model, disk_codec=config.codec))
        self.tiers = tiers if tiers is not None else build_tiers(spec, config)
        self.executor = Executor(self.tiers, on_complete=self._on_complete)
        self.decider.set_canceller(self.executor.cancel)
        # a decision and the submission of its commands happen under the decider's (reentrant) lock, so
        # the executor receives commands in decision order: a slot freed by one decision and reused by
        # the next is read before it is written again (decided in one order and submitted in the other,
        # a load read another block's bytes). One lock for both: no lock-order inversion.
        self._lock = self.decider.lock
        self._closed = False
        self._stall = [0.0]
        if TierName.DISK in self.tiers:
            self.decider.rebuild_from_disk(self.tiers[TierName.DISK].keys())
        remote = self.tiers.get(TierName.REMOTE)
        if remote is not None and TierName.REMOTE in self.decider.tiers:
            self.decider.remote_probe = remote.probe
        self._prefetcher = (Prefetcher(self._prefetch_round)
                            if config.prefetch and len(self.decider.tiers) > 1 else None)

    # -- plumbing --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("OffloadManager is closed")

    def _submit_all(self, commands: Sequence[Command], buffer: KVBuffer | None = None) -> list[TransferHandle]:
        return [self.executor.submit(c, buffer) for c in commands]

    def _prefetch_round(self) -> None:
        with self._lock:
            self._submit_all(self.decider.next_prefetch())

    def _on_complete(self, completion: Completion) -> None:
        with self._lock:
            follow_ups = self.decider.complete(completion)
            if follow_ups and not self._closed:
                self._submit_all(follow_ups)
        if self._prefetcher is not None:
            self._prefetcher.wake()

    def keys(self, token_ids: Any) -> list[BlockKey]:
        """Keys of the full blocks of `token_ids` (namespaced by the model and the salt)."""
        return self.keychain.keys(token_ids)

    # -- engine events ---------------------------------------------------------------------------

    def enqueue(self, request_id: str, token_ids: Any, hint: RetentionHint | None = None) -> int:
        """A request joined the engine's waiting queue; prefetch of its cached blocks starts.

        Args:
            hint: optional retention hint (session id, whether the conversation continues, priority),
                used by the `auto` policy; see `kvtier.scheduler.policies.RetentionHint`.

        Returns:
            The number of leading tokens cached now (any tier).
        """
        return self.enqueue_keys(request_id, self.keys(token_ids), len(token_ids), hint)

    def enqueue_keys(self, request_id: str, keys: Sequence[BlockKey], num_tokens: int,
                     hint: RetentionHint | None = None) -> int:
        """`enqueue` with the block keys already computed (e.g. a trace's ids, or an engine's own hashes
        mapped to kvtier keys); returns the leading tokens cached now."""
        self._check_open()
        self.decider.enqueue(request_id, keys, num_tokens, hint)
        self.decider.probe_remote(keys)
        if self._prefetcher is not None:
            self._prefetcher.wake()
        return len(self.decider.index.lookup(keys)) * self.spec.block_tokens

    def lookup(self, token_ids: Any) -> int:
        """Leading tokens of `token_ids` cached in any tier (whole blocks; the remote probed)."""
        keys = self.keys(token_ids)
        self.decider.probe_remote(keys)
        return len(self.decider.lookup(keys)) * self.spec.block_tokens

    def plan(self, request_id: str, token_ids: Any = None) -> Plan:
        """The restore-vs-recompute plan of a request (enqueued, or given its tokens now)."""
        self._check_open()
        if token_ids is not None:
            if self.decider.request(request_id) is None:
                keys = self.keys(token_ids)
                self.decider.enqueue(request_id, keys, len(token_ids))
                self.decider.probe_remote(keys)
            return self.decider.plan(request_id, self.keys(token_ids), len(token_ids))
        return self.decider.plan(request_id)

    def load(self, request_id: str, buffer: KVBuffer, plan: Plan | None = None,
             dst_blocks: Sequence[int] | None = None) -> Loading:
        """Starts restoring the blocks the plan restores into the engine's KV.

        Args:
            request_id: the request (enqueued, or planned with its tokens).
            buffer: the engine's KV memory.
            plan: the plan to follow (default: `plan(request_id)`).
            dst_blocks: the engine block of each prompt block (default: block i -> i).

        Returns:
            A `Loading`; the engine waits on it layer by layer and computes the rest.
        """
        self._check_open()
        plan = plan or self.plan(request_id)
        state = self.decider.request(request_id)
        keys = state.keys if state is not None else ()
        first, stop = plan.split, plan.restore_stop
        dst = list(dst_blocks) if dst_blocks is not None else list(range(len(keys)))
        with self._lock:
            load = self.decider.start_load(request_id, keys, first, stop, dst[first:stop]) if stop > first else None
            self._submit_all(self.decider.take_prepared())
            if load is None:
                self.decider.start_load(request_id, keys, 0, 0, [])  # marks the request running
                return Loading(plan, None, first, first, self._stall, self.config.load_timeout_s)
            handle = self.executor.submit(load, buffer)
        return Loading(plan, handle, first, stop, self._stall, self.config.load_timeout_s)

    def store(self, request_id: str, token_ids: Any, buffer: KVBuffer, src_blocks: Sequence[int] | None = None,
              first_block: int = 0) -> TransferHandle:
        """Saves the full blocks of `token_ids` not cached yet, asynchronously.

        Args:
            request_id: the request.
            token_ids: the tokens whose KV the engine holds (the prompt, optionally plus output).
            buffer: the engine's KV memory.
            src_blocks: the engine block of each prompt block from `first_block` on (default: i -> i).
            first_block: skip the first blocks (already known to be cached).

        Returns:
            A handle done when the blocks are in kvtier's memory tier (disk writes follow on their own).
        """
        return self.store_keys(request_id, self.keys(token_ids)[first_block:], buffer, src_blocks, first_block)

    def store_keys(self, request_id: str, keys: Sequence[BlockKey], buffer: KVBuffer,
                   src_blocks: Sequence[int] | None = None, first_block: int = 0) -> TransferHandle:
        """`store` with the keys of blocks `first_block`, `first_block + 1`, ... already computed."""
        self._check_open()
        src = list(src_blocks) if src_blocks is not None else list(range(first_block, first_block + len(keys)))
        with self._lock:
            commands = self.decider.start_save(request_id, keys, src, first_block)
            handles = self._submit_all(commands, buffer)
        if commands and isinstance(commands[-1], Save):
            return handles[-1]
        return TransferHandle.completed(keys)

    def finish(self, request_id: str, hint: RetentionHint | None = None) -> None:
        """The request is done: its protections are released; `hint` (else the one given at `enqueue`)
        tells the `auto` policy whether its session continues."""
        self.decider.finish(request_id, hint)

    def cancel(self, request_id: str) -> None:
        """The request left the queue: its prefetch protections are released (promotions in flight land)."""
        self.decider.cancel(request_id)

    # -- reporting and shutdown ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: hits per tier, restored and saved blocks, prefetch coverage, stall time, tier usage."""
        with self.decider.lock:
            s = asdict(self.decider.stats)
            s["blocks_by_tier"] = {str(t): self.decider.count_in(t) for t in self.decider.tiers}
        s["prefetch_coverage"] = (s["prefetch_ready_blocks"] / s["restored_blocks"]) if s["restored_blocks"] else None
        s["prefetch_used_fraction"] = (s["prefetch_used_blocks"] / s["prefetched_blocks"]) if s["prefetched_blocks"] else None
        s["stall_s"] = round(self._stall[0], 6)
        disk = self.tiers.get(TierName.DISK)
        if disk is not None and hasattr(disk, "stats"):
            s["disk"] = asdict(disk.stats) if not callable(disk.stats) else asdict(disk.stats())
        remote = self.tiers.get(TierName.REMOTE)
        if remote is not None and hasattr(remote, "stats"):
            s["remote"] = asdict(remote.stats())
        return s

    def flush(self, timeout: float = 60.0) -> None:
        """Waits until every queued copy and disk write has finished."""
        deadline = time.monotonic() + timeout
        while True:
            with self.decider.lock:
                pending = list(self.decider.pending.values())
            if not pending:
                return
            if time.monotonic() > deadline:
                what = ", ".join(f"{type(p.command).__name__}#{p.command.command_id}" for p in pending[:5])
                raise TransferTimeout(f"flush: {len(pending)} commands still pending after {timeout} s ({what})")
            done = threading.Event()
            done.wait(0.005)

    def close(self) -> None:
        """Stops prefetching, finishes queued saves (disk writes are flushed), joins every thread,
        closes the tiers (idempotent)."""
        if self._closed:
            return
        if self._prefetcher is not None:
            self._prefetcher.close()
        try:
            self.flush(timeout=60.0)
        except TransferTimeout as err:
            log.warning("close: %s", err)
        self._closed = True
        self.executor.close()
        # the executor and the decider call back into this manager: unhooked, a closed manager (and its
        # pools) is freed when its last user lets go, not at some later full garbage collection
        self.executor.on_complete = None
        self.decider.set_canceller(None)

    def __enter__(self) -> "OffloadManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_tiers(spec: KVSpec, config: OffloadConfig) -> dict[TierName, Tier]:
    """The tiers a config asks for."""
    from kvtier.tiers.codecs import Codec
    from kvtier.tiers.disk.store import DiskTier
    from kvtier.tiers.pool import GpuTier, HostTier

    tiers: dict[TierName, Tier] = {}
    if config.gpu_bytes:
        tiers[TierName.GPU] = GpuTier(spec, config.gpu_bytes)
    if config.host_bytes:
        tiers[TierName.HOST] = HostTier(spec, config.host_bytes)
    if config.disk_bytes:
        tiers[TierName.DISK] = DiskTier(config.disk_path, spec, config.disk_bytes, codec=Codec.parse(config.codec),
                                         read_threads=config.disk_read_threads, uncached_reads=config.disk_uncached_reads)
    if config.remote_url:
        tiers[TierName.REMOTE] = remote_tier(spec, config)
    return tiers


def remote_tier(spec: KVSpec, config: OffloadConfig) -> Tier:
    """The remote tier a config names (connected and checked: a wrong password fails here)."""
    from kvtier.tiers.remote import RemoteTier

    return RemoteTier(spec, config.remote_url, config.remote_bytes, timeout_s=config.remote_timeout_s,
                      codec=config.remote_codec, salt=config.salt, ttl_s=config.remote_ttl_s)


def default_cost_model(spec: KVSpec, hardware: str | None, model_config: Any = None) -> Any:
    """The cost model of `spec` on `hardware` (a profile name, a profile JSON or a calibrated cost-model
    JSON from `kvtier calibrate`; None: the built-in profile of a CPU machine like this one).

    `model_config` (a HF config dict) gives the FLOP counts; by default the preset whose model_id is
    `spec.model_id`.
    """
    from kvtier.tiers.spec import PRESETS

    from kvtier.scheduler.cost.model import CostModel

    if model_config is None:
        model_config = next((dict(c) for c in PRESETS.values() if c["_name_or_path"] == spec.model_id), None)
    if model_config is None:
        raise ConfigError(f"model {spec.model_id!r} is not a preset: pass its config (model_config=...) or a "
                          f"cost_model to OffloadManager")
    if hardware and hardware.endswith(".json"):
        try:
            return CostModel.load(hardware, model_config).with_spec(spec)
        except ConfigError:
            pass  # a plain hardware profile rather than a calibrated model
    return CostModel.from_profile(hardware or "cpu-this-machine", model_config, spec=spec)
