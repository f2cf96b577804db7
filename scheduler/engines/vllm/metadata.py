"""The plain data that crosses vLLM's connector boundary, in a leaf module.

- `KvtierMeta` (scheduler -> worker, once per step): `before` runs at `start_load_kv` (this step's
  loads, promotions, write-through, evictions), `after` at `wait_for_save` (saves of blocks computed
  this step), `failed_blocks` (vLLM blocks promised but not loadable), `cold_reset`;
- `KvtierWorkerMeta` (worker -> scheduler): the worker's `Completion`s since its last report.

Both sides import this module; it imports neither side, so the scheduler side and the connector do
not depend on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvtier.tiers.commands import Command, Completion


@dataclass
class KvtierMeta(KVConnectorMetadata):
    """One step's commands for the worker (plain picklable data: keys, slots, block ids)."""

    before: list[Command] = field(default_factory=list)
    after: list[Command] = field(default_factory=list)
    failed_blocks: list[int] = field(default_factory=list)
    cold_reset: bool = False


@dataclass
class KvtierWorkerMeta(KVConnectorWorkerMetadata):
    """The worker's completions since its last report."""

    completions: list[Completion] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KvtierWorkerMeta):
            return KvtierWorkerMeta(self.completions + other.completions)
        return self
