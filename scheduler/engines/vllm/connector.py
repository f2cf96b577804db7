"""kvtier as a vLLM V1 KV connector: the decision half in vLLM's scheduler, the byte half in its worker.

Load it with
`--kv-transfer-config '{"kv_connector": "KvtierConnector",
"kv_connector_module_path": "kvtier.scheduler.engines.vllm_connector", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"host_bytes": "2GiB", ...}}'`
(the extra config is an `OffloadConfig`; `gpu_bytes` must stay 0: vLLM's paged KV is the GPU tier).

Primitives:
- `KvtierConnector(vllm_config, role, kv_cache_config)`: a `KVConnectorBase_V1` that builds a
  `SchedulerSide` (EngineCore process) or a `WorkerSide` (worker process) and delegates to it;
- `KvtierMeta`: the step's commands (scheduler -> worker): `before` run at `start_load_kv` (loads of
  this step, promotions, write-through, evictions), `after` at `wait_for_save` (saves of blocks
  computed in this step), `failed_blocks` (vLLM blocks promised but not loadable), `cold_reset`;
- `KvtierWorkerMeta`: the worker's `Completion`s (worker -> scheduler), fed to `Decider.complete`.

How a request goes (vLLM's side of the contract is `KVConnectorBase_V1`'s docstrings):
- `on_new_request`: the prompt's BlockKeys are hashed once; the request is queued in the `Decider`,
  whose prefetch decisions (disk -> host `Move`s) ride in the next step's metadata;
- `get_num_new_matched_tokens`: `(None, False)` ("not yet") while a promotion of one of its blocks is
  in flight; else the planner's restore-vs-recompute plan over the matched blocks decides how many
  blocks are restored; a fully cached last block is loaded whole and one token recomputed
  (`len - 1` reported, not block aligned). Loads are synchronous: the worker copies layer group by
  layer group on its copy thread while the forward waits per layer (`wait_for_layer_load`);
- `build_connector_meta`: full prompt blocks whose last token is computed this step are saved
  (`Decider.start_save`); the worker copies them in `wait_for_save` (about 12 ms per 2k tokens), so
  `request_finished` never needs to hold blocks and returns False; write-through to disk follows
  from the save's completion (`Decider.complete`) and runs in the background;
- a block that fails its disk checks is dropped from the books and reported by vLLM block id through
  `get_block_ids_with_load_errors`, so vLLM recomputes it (needs `kv_load_failure_policy="recompute"`).
- `request_finished` returns `{"kvtier": {"restored_blocks": n, "ready_blocks": m}}` for a request
  that restored blocks (m of them were in host when their load began); vLLM puts it in the request's
  output as `kv_transfer_params`;
- restart: the scheduler side lists the disk store read-only at start and rebuilds its disk index.
- `llm.reset_prefix_cache(reset_connector=True)`: the host tier is emptied (the books first) and the
  worker closes its disk store, drops its pages from the page cache and reopens it: the next disk
  restore is truly cold (what `kvtier bench vllm` measures).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.engines.vllm.buffer import VllmKVBuffer, vllm_spec
from kvtier.scheduler.engines.vllm.metadata import KvtierMeta, KvtierWorkerMeta

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def parse_config(extra: dict[str, Any] | None) -> OffloadConfig:
    """`kv_connector_extra_config` as an `OffloadConfig` (unknown keys are a ConfigError naming them)."""
    config = OffloadConfig.from_dict(dict(extra or {}), "kv_connector_extra_config")
    if config.gpu_bytes:
        raise ConfigError(f"kv_connector_extra_config: gpu_bytes={config.gpu_bytes}; expected 0 under vLLM "
                          f"(vLLM's paged KV is the GPU tier)")
    if not config.host_bytes:
        raise ConfigError("kv_connector_extra_config: host_bytes must be > 0 (loads go through host slots)")
    return config


class KvtierConnector(KVConnectorBase_V1):
    """kvtier's tiered KV cache (host RAM, LMDB disk) as a vLLM V1 KV connector."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        config = parse_config(transfer.kv_connector_extra_config)
        if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning("kv_load_failure_policy=%r: a block that fails its checks fails its request; set "
                        "'recompute' so vLLM recomputes it instead", transfer.kv_load_failure_policy)
        spec = vllm_spec(vllm_config)
        self.spec = spec
        if role == KVConnectorRole.SCHEDULER:
            from kvtier.scheduler.engines.vllm.scheduler_side import SchedulerSide

            self.scheduler = SchedulerSide(spec, config, vllm_config)
            self.worker = None
        else:
            from kvtier.scheduler.engines.vllm.worker import WorkerSide

            self.worker = WorkerSide(spec, config)
            self.scheduler = None
        log.info("kvtier connector (%s): %s, blocks of %d tokens (%s), layout %s", role.name, spec.model_id,
                 spec.block_tokens, spec.fingerprint[:8], spec.layout)

    # -- worker side ---------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register(VllmKVBuffer(self.spec, kv_caches))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, KvtierMeta):
            self.worker.start_step(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # whole blocks are saved in wait_for_save (one copy per page, after the forward)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        self.worker.end_step(meta if isinstance(meta, KvtierMeta) else None)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # loads are synchronous, saves are done before the step ends

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        completions = self.worker.take_completions()
        return KvtierWorkerMeta(completions) if completions else None

    # -- scheduler side ------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self.scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KvtierWorkerMeta):
            self.scheduler.completed(meta.completions)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from kvtier.scheduler.engines.vllm.scheduler_side import request_hint  # lazily, as SchedulerSide

        # a request that restored blocks reports how many came from host (its output's kv_transfer_params)
        return False, self.scheduler.finished(request.request_id, request_hint(request))

    def on_new_request(self, request: "Request") -> None:  # type: ignore[override]
        self.scheduler.new_request(request)

    def has_pending_push_work(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_pending_work()

    def reset_cache(self) -> bool | None:
        if self.scheduler is not None:
            return self.scheduler.reset()
        return True

    def take_events(self) -> Any:
        return ()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()
