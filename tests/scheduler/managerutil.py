"""What the OffloadManager tests share: a tiny model config (no weights needed) and its KVSpec."""

from __future__ import annotations

from kvtier.tiers.spec import KVSpec

#: the HF config the manager's cost model reads (4 layers, 2 KV heads of 8 dims, float32)
MODEL = {"_name_or_path": "test/tiny", "num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 256}


def tiny_spec() -> KVSpec:
    """MODEL's KV geometry in 16-token blocks."""
    return KVSpec(model_id="test/tiny", num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32",
                  block_tokens=16, weights_revision="random-0")
