"""The scheduler side of kvtier's vLLM connector: the decision half in vLLM's EngineCore process.

Primitives: `SchedulerSide(spec, config, vllm_config)` with one method per connector hook
(`new_request`, `num_new_matched_tokens`, `after_alloc`, `build_meta`, `completed`, `finished`,
`has_pending_work`, `reset`, `close`).

Invariants:
- every decision is the `Decider`'s (index, slot tables, policies, eviction cascade, prefetch and save
  decisions) and the `Planner`'s (restore vs recompute); this module only maps vLLM's events onto
  them and ships the resulting commands in the step's `KvtierMeta`, in decision order;
- a block is counted loadable only when it is in the host tier now; a block whose promotion is in
  flight makes the request wait ("not yet"), so a load never races its source; blocks on disk or on the
  remote (probed once per new request) are promoted first;
- the disk index is rebuilt from the store's key listing at start (opened read-only, closed at once:
  the worker process owns the store).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kvtier.tiers.commands import Command, Completion, Move, MoveReason
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.keys import BlockKey, KeyChain
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.decider import Decider
from kvtier.scheduler.manager import default_cost_model
from kvtier.scheduler.planner import Planner
from kvtier.scheduler.policies import RetentionHint
from kvtier.scheduler.engines.vllm.metadata import KvtierMeta

log = logging.getLogger(__name__)

#: finished requests between two logs of the prefetch counters
STATS_EVERY = 100

#: tiers whose blocks are promoted into host memory before vLLM is told they are loadable
_PROMOTED = (TierName.DISK, TierName.REMOTE)


def request_hint(request: Any) -> RetentionHint | None:
    """The retention hint in a vLLM request's `kv_transfer_params` (`session`, `continues`,
    `priority`), or None; a malformed hint is logged and ignored (it must never fail a request)."""
    try:
        return RetentionHint.from_params(getattr(request, "kv_transfer_params", None))
    except ConfigError as err:
        log.warning("kvtier: request %s: retention hint ignored (%s)", getattr(request, "request_id", "?"), err)
        return None


@dataclass(slots=True)
class _Req:
    keys: tuple[BlockKey, ...]
    num_tokens: int
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    saved: int = 0  # prompt blocks [0, saved) saved or known cached
    load: tuple[int, int] | None = None  # blocks [first, stop) promised to vLLM
    restored: int = 0  # blocks its loads restored
    ready: int = 0  # of those, in host when the load began (or joined on their way there)


class SchedulerSide:
    """The decision half of the connector (see the module docstring)."""

    def __init__(self, spec: KVSpec, config: OffloadConfig, vllm_config: Any) -> None:
        self.spec = spec
        self.config = config
        self.block_tokens = spec.block_tokens
        self.keychain = KeyChain.for_spec(spec, config.salt)
        hf = vllm_config.model_config.hf_config
        model_config = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        model_config.setdefault("_name_or_path", spec.model_id)
        cost_model = default_cost_model(spec, config.hardware, model_config)
        self.decider = Decider(spec, config, Planner(cost_model, disk_codec=config.codec), whole_last_block=True)
        self.reqs: dict[str, _Req] = {}
        self.outbox: list[Command] = []
        self.failed_blocks: list[int] = []
        self.inflight: dict[int, tuple[BlockKey, ...]] = {}
        self.inflight_keys: Counter[BlockKey] = Counter()
        self.cold_reset = False
        self.num_finished = 0
        if config.disk_bytes and config.disk_path:
            self._rebuild_disk_index()
        # the remote is probed from here (one round trip per node per new request); the worker moves the bytes
        self._remote = None
        if config.remote_url:
            from kvtier.scheduler.manager import remote_tier

            self._remote = remote_tier(spec, config)
            self.decider.remote_probe = self._remote.probe

    def _rebuild_disk_index(self) -> None:
        from kvtier.tiers.disk.store import DiskTier

        if not os.path.exists(DiskTier.data_file_of(self.config.disk_path)):
            return
        disk = DiskTier(self.config.disk_path, self.spec, self.config.disk_bytes, readonly=True)
        try:
            keys = disk.keys()
        finally:
            disk.close()
        n = self.decider.rebuild_from_disk(keys)
        log.info("kvtier: %d blocks found on disk at %s", n, self.config.disk_path)

    # -- helpers ---------------------------------------------------------------------------------------

    def _ship(self, commands: Sequence[Command]) -> None:
        for command in commands:
            if isinstance(command, Move) and command.reason is MoveReason.PREFETCH:
                self.inflight[command.command_id] = command.keys
                self.inflight_keys.update(command.keys)
            self.outbox.append(command)

    def _prefetch(self) -> None:
        if self.config.prefetch:
            self._ship(self.decider.next_prefetch())

    def _state(self, request: Any) -> _Req:
        state = self.reqs.get(request.request_id)
        if state is None:
            tokens = np.asarray(request.prompt_token_ids, dtype=np.int32)
            state = _Req(tuple(self.keychain.keys(tokens)), len(tokens))
            self.reqs[request.request_id] = state
            self.decider.enqueue(request.request_id, state.keys, state.num_tokens, request_hint(request))
            self.decider.probe_remote(state.keys)
        return state

    # -- hooks -----------------------------------------------------------------------------------------

    def new_request(self, request: Any) -> None:
        """A request was queued: hash its prompt, queue it, start promoting its blocks."""
        self._state(request)
        self._prefetch()

    def num_new_matched_tokens(self, request: Any, num_computed: int) -> tuple[int | None, bool]:
        """Tokens loadable beyond vLLM's own prefix hit; (None, False) while a promotion is awaited."""
        state = self._state(request)
        state.load = None
        bt = self.block_tokens
        first = num_computed // bt
        entries = self.decider.lookup(state.keys)
        if len(entries) <= first:
            return 0, False
        if any(e.key in self.inflight_keys for e in entries[first:]):
            return None, False
        if any(e.best_tier in _PROMOTED for e in entries[first:]) and self.config.prefetch:
            self._prefetch()
            if any(e.key in self.inflight_keys for e in entries[first:]):
                return None, False
        plan = self.decider.planner.plan([e.best_tier for e in entries], state.num_tokens, block_tokens=bt)
        stop = plan.whole_block_stop  # the prompt's full last block: loaded whole, its last token recomputed
        hit = min(stop * bt, state.num_tokens - 1)
        if stop <= first or hit <= num_computed:
            return 0, False
        state.load = (first, stop)
        return hit - num_computed, False

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """vLLM allocated the request's blocks: the promised load becomes a `Load` command."""
        state = self.reqs.get(request.request_id)
        if state is None or num_external_tokens <= 0 or state.load is None:
            return
        first, stop = state.load
        state.load = None
        block_ids = list(blocks.get_block_ids()[0])
        dst = block_ids[first:stop]
        load = self.decider.start_load(request.request_id, state.keys, first, stop, dst)
        self._ship(self.decider.take_prepared())
        if load is None:  # vanished since the lookup (it cannot here: same schedule() call); recompute
            self.failed_blocks.extend(dst)
        else:
            state.restored += len(load.keys)
            state.ready += sum(1 for tier in load.src_tiers if tier not in _PROMOTED)
            self._ship([load])

    def build_meta(self, so: Any) -> KvtierMeta:
        """This step's commands: loads and moves before the forward, saves of blocks it computes after."""
        for new in so.scheduled_new_reqs:
            state = self.reqs.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                state.computed = new.num_computed_tokens
                if self.decider.request(new.req_id) is not None and new.req_id in self.decider.queue:
                    self.decider.start_load(new.req_id, state.keys, 0, 0, [])  # marks it running
        cached = so.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            state = self.reqs.get(rid)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in resumed and new_ids is not None:
                state.block_ids = list(new_ids[0])
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            state.computed = cached.num_computed_tokens[i]
        saves: list[Command] = []
        for rid, num in so.num_scheduled_tokens.items():
            state = self.reqs.get(rid)
            if state is None:
                continue
            done = min(len(state.keys), (state.computed + num) // self.block_tokens, len(state.block_ids))
            if done > state.saved:
                saves.extend(self.decider.start_save(rid, state.keys[state.saved:done],
                                                     state.block_ids[state.saved:done], state.saved))
                state.saved = done
        meta = KvtierMeta(self.outbox, saves, self.failed_blocks, self.cold_reset)
        self.outbox, self.failed_blocks, self.cold_reset = [], [], False
        return meta

    def completed(self, completions: Sequence[Completion]) -> None:
        """The worker's completions: books updated, follow-ups (write-through) queued for the next step."""
        for completion in completions:
            keys = self.inflight.pop(completion.command_id, None)
            if keys is not None:
                self.inflight_keys.subtract(keys)
                self.inflight_keys += Counter()  # drops zero counts
            self._ship(self.decider.complete(completion))
        if completions:
            self._prefetch()

    def finished(self, request_id: str, hint: RetentionHint | None = None) -> dict[str, Any] | None:
        """The request finished or was aborted: its protections go (saves were done in its steps) and
        its retention hint (this one, else the one read when it was queued) reaches the policy.

        Returns:
            For a request that restored blocks, `{"kvtier": {"restored_blocks": n, "ready_blocks": m}}`
            (m of its n restored blocks were in host when their load began: prefetch's coverage of
            it), which vLLM hands back in the request's output as `kv_transfer_params`; else None.
        """
        state = self.reqs.pop(request_id, None)
        self.decider.finish(request_id, hint)
        self.num_finished += 1
        if self.num_finished % STATS_EVERY == 0:
            self.log_stats()
        if state is None or not state.restored:
            return None
        return {"kvtier": {"restored_blocks": state.restored, "ready_blocks": state.ready}}

    def log_stats(self) -> None:
        """Logs the prefetch counters (docs/prefetch.md): every `STATS_EVERY` requests and at close."""
        s = self.decider.stats
        log.info("kvtier prefetch: %d blocks promoted in %d moves, %d used, %d evicted unused, %d cancelled, "
                 "%d joined, %d double reads; promotion latency %.1f ms mean; disk %.2f s loads, %.2f s "
                 "promotions (predicted)", s.prefetched_blocks, s.prefetch_moves, s.prefetch_used_blocks,
                 s.prefetch_evicted_unused_blocks, s.prefetch_cancelled_blocks, s.prefetch_joined_blocks,
                 s.double_reads, 1e3 * s.promotion_latency_s / max(1, s.prefetch_moves), s.disk_load_s,
                 s.disk_prefetch_s)

    def has_pending_work(self) -> bool:
        """Commands to ship or promotions to hear back from: the engine must keep stepping."""
        return bool(self.outbox or self.inflight or self.failed_blocks or self.cold_reset)

    def reset(self) -> bool:
        """Empties the host tier (books first) and asks the worker to reopen its disk store cold."""
        self.decider.drop_tier(TierName.HOST)
        self.cold_reset = True
        return True

    def close(self) -> None:
        self.log_stats()
        if self._remote is not None:
            self._remote.close()
            self._remote = None
