"""vLLM V1 KV connector: `connector` (what vLLM loads), `scheduler_side`, `worker`, `metadata`, `buffer`.

Importing this package does not import vLLM; its modules do.
"""
