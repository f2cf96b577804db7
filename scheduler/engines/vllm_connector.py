"""The path users give vLLM: `kv_connector_module_path = "kvtier.scheduler.engines.vllm_connector"`.

A stable name for `kvtier.scheduler.engines.vllm.connector` (the connector lives in the
`engines/vllm/` package with its scheduler side, worker side and metadata).
"""

from kvtier.scheduler.engines.vllm.connector import KvtierConnector, parse_config
from kvtier.scheduler.engines.vllm.metadata import KvtierMeta, KvtierWorkerMeta

__all__ = ["KvtierConnector", "KvtierMeta", "KvtierWorkerMeta", "parse_config"]
