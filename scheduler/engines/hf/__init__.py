"""Hugging Face transformers in process: `HFEngine` (prefill with restore), its KV buffer, layer waits."""

from kvtier.scheduler.engines.hf.adapter import HFEngine
from kvtier.scheduler.engines.hf.generate import greedy_generate, prefill
from kvtier.scheduler.engines.hf.kv import HFKVBuffer, spec_for_model

__all__ = ["HFEngine", "HFKVBuffer", "greedy_generate", "prefill", "spec_for_model"]
