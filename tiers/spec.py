"""KVSpec: the KV geometry of one model, and the named presets.

Primitives:
- `KVSpec`: model identity (`model_id`, `weights_revision`) plus geometry (`num_layers`, `kv_factor`,
  `num_kv_heads`, `head_dim`, `dtype`, `block_tokens`) and the inner `layout` name. Gives
  `bytes_per_token`, `bytes_per_block`, the per-block tensor shape and the `fingerprint` that every
  stored block carries.
- `KVSpec.from_hf_config(config)` and `KVSpec.from_preset(name)`; `PRESETS` holds real model configs
  (the keys a Hugging Face `config.json` has), which the cost model also reads for FLOP counts.

Invariants:
- the fingerprint is blake2b-16 of the canonical JSON of all nine fields (docs/design.md "Specifications"),
  so two specs that differ in any field, weights included, never share stored KV;
- a block is one contiguous buffer, layer-major: `[num_layers][kv_factor][num_kv_heads][block_tokens]
  [head_dim]` for the default layout, so one layer (or layer group) of a block is one contiguous slice.

This module does not import torch (the replay CLI must start fast); `torch_dtype` imports it lazily.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields as dataclass_fields, replace
from typing import Any, Mapping

from kvtier.tiers.errors import ConfigError

DEFAULT_LAYOUT = "layer-kv-head-token-dim/1"

#: bytes per element of each dtype name kvtier accepts
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "fp8": "float8_e4m3fn", "torch.float32": "float32", "torch.float16": "float16",
                  "torch.bfloat16": "bfloat16"}


def canonical_dtype(dtype: Any) -> str:
    """Returns the canonical dtype name for a name, alias or torch dtype.

    Raises:
        ConfigError: the dtype is not one kvtier stores.
    """
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ConfigError(f"dtype: {dtype!r} is not supported; expected one of {', '.join(DTYPE_BYTES)}")
    return name


@dataclass(frozen=True, slots=True)
class KVSpec:
    """The KV geometry of one model and the identity of its weights.

    Attributes:
        model_id: the model's name (a Hugging Face repo id or a local name).
        weights_revision: first 16 hex digits of the sha256 of the weight files, `random-<seed>` for
            random weights, empty only for geometry-only uses that store no bytes.
        num_layers: decoder layers that keep KV.
        num_kv_heads: KV heads per layer (1 for an MLA latent).
        head_dim: elements per head per token (the latent width for MLA).
        dtype: element type name, e.g. "bfloat16".
        kv_factor: 2 for separate K and V, 1 for an MLA latent.
        block_tokens: tokens per block.
        layout: name of the inner order of a block's buffer.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_factor: int = 2
    block_tokens: int = 64
    weights_revision: str = ""
    layout: str = DEFAULT_LAYOUT
    _fingerprint: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"KVSpec.{name}: expected a positive int, got {value!r}")
        if self.kv_factor not in (1, 2):
            raise ConfigError(f"KVSpec.kv_factor: expected 1 (MLA latent) or 2 (K and V), got {self.kv_factor!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ConfigError(f"KVSpec.model_id: expected a non-empty string, got {self.model_id!r}")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        digest = hashlib.blake2b(self.canonical_json().encode(), digest_size=16).digest()
        object.__setattr__(self, "_fingerprint", digest)

    # -- identity -------------------------------------------------------------------------------

    def fields(self) -> dict[str, Any]:
        """The nine fields that define the spec (what the fingerprint covers)."""
        return {name: getattr(self, name) for name in _SPEC_FIELDS}

    def canonical_json(self) -> str:
        """The canonical JSON the fingerprint is computed from (sorted keys, no spaces)."""
        return json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        """blake2b-16 of the canonical JSON, as 32 hex digits."""
        return self._fingerprint.hex()

    @property
    def fingerprint_bytes(self) -> bytes:
        """The fingerprint's 16 raw bytes (the root of every block key's namespace)."""
        return self._fingerprint

    def with_(self, **changes: Any) -> "KVSpec":
        """A copy with some fields changed (e.g. another `block_tokens` or `dtype`)."""
        return replace(self, **changes)

    # -- geometry -------------------------------------------------------------------------------

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token across all layers."""
        return self.num_layers * self.kv_factor * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block across all layers."""
        return self.bytes_per_token * self.block_tokens

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer of one block (one contiguous slice of the block's buffer)."""
        return self.bytes_per_block // self.num_layers

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block in the default layer-major layout."""
        return (self.num_layers, self.kv_factor, self.num_kv_heads, self.block_tokens, self.head_dim)

    def layer_range(self, start: int, stop: int) -> tuple[int, int]:
        """Byte range [lo, hi) of layers [start, stop) within one block's buffer."""
        if not 0 <= start < stop <= self.num_layers:
            raise ConfigError(f"layer range [{start}, {stop}) outside 0..{self.num_layers}")
        return start * self.layer_bytes, stop * self.layer_bytes

    def layer_groups(self, num_groups: int, growth: float = 1.0) -> list[tuple[int, int]]:
        """Splits the layers into `num_groups` contiguous groups, as [start, stop), each about `growth` times
        the size of the one before (1: near-equal; every group at least one layer).

        Why grow: an engine computes group g while group g + 1 arrives. When it computes a layer more
        slowly than a layer arrives (growth > 1), a small first group lets it start early and each larger
        group arrives while the one before is computed; when arriving is the slower (growth < 1), a small
        last group leaves little to compute once the last bytes are in.

        Raises:
            ConfigError: `num_groups` outside 1..num_layers or `growth` not a positive finite number.
        """
        if not 1 <= num_groups <= self.num_layers:
            raise ConfigError(f"num_groups: expected 1..{self.num_layers}, got {num_groups!r}")
        if not isinstance(growth, (int, float)) or not 0 < growth < float("inf"):
            raise ConfigError(f"growth: expected a positive finite number, got {growth!r}")
        layers, weights = self.num_layers, [growth ** i for i in range(num_groups)]
        total, bounds, done = sum(weights), [0], 0.0
        for i, weight in enumerate(weights[:-1]):
            done += weight
            bounds.append(min(max(round(layers * done / total), bounds[-1] + 1), layers - (num_groups - 1 - i)))
        bounds.append(layers)
        return [(bounds[i], bounds[i + 1]) for i in range(num_groups)]

    def num_blocks(self, num_tokens: int) -> int:
        """Full blocks in `num_tokens` tokens (an engine caches only full blocks)."""
        return num_tokens // self.block_tokens

    @property
    def torch_dtype(self):  # -> torch.dtype, typed loosely so this module does not import torch
        """The torch dtype of the elements (imports torch)."""
        import torch

        return getattr(torch, self.dtype)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_hf_config(
        cls,
        config: Mapping[str, Any] | Any,
        *,
        model_id: str | None = None,
        weights_revision: str = "",
        dtype: Any = None,
        block_tokens: int = 64,
        layout: str = DEFAULT_LAYOUT,
    ) -> "KVSpec":
        """Builds a spec from a Hugging Face config (a dict or a `PretrainedConfig`).

        MLA models (a `kv_lora_rank` key, as DeepSeek-V2/V3) store one latent of
        `kv_lora_rank + qk_rope_head_dim` per token per layer: kv_factor 1, one head.

        Raises:
            ConfigError: a field the geometry needs is missing.
        """
        cfg = config if isinstance(config, Mapping) else config.to_dict()
        cfg = dict(cfg.get("text_config") or {}, **{k: v for k, v in cfg.items() if k != "text_config"}) \
            if "num_hidden_layers" not in cfg and "text_config" in cfg else cfg

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ConfigError(f"model config: missing {key!r}, needed for the KV geometry")
            return cfg[key]

        model_id = model_id or cfg.get("_name_or_path") or cfg.get("model_id") or cfg.get("model_type") or "unknown"
        dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        num_layers = int(need("num_hidden_layers"))
        if cfg.get("kv_lora_rank"):
            return cls(model_id=model_id, weights_revision=weights_revision, num_layers=num_layers, num_kv_heads=1,
                       head_dim=int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0), dtype=dtype,
                       kv_factor=1, block_tokens=block_tokens, layout=layout)
        num_heads = int(need("num_attention_heads"))
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = int(cfg.get("head_dim") or int(need("hidden_size")) // num_heads)
        return cls(model_id=model_id, weights_revision=weights_revision, num_layers=num_layers,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, kv_factor=2,
                   block_tokens=block_tokens, layout=layout)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "KVSpec":
        """Builds the spec of a named preset (see `PRESETS`); keyword arguments override fields.

        Raises:
            ConfigError: the name is not a preset.
        """
        config = preset_config(name)
        kwargs = {"model_id": config["_name_or_path"], "dtype": config["torch_dtype"]}
        kwargs.update(overrides)
        return cls.from_hf_config(config, **kwargs)


_SPEC_FIELDS = tuple(f.name for f in dataclass_fields(KVSpec) if not f.name.startswith("_"))


def _llama(name: str, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int, ctx: int,
           dtype: str = "bfloat16", **extra: Any) -> dict[str, Any]:
    return {"_name_or_path": name, "model_type": extra.pop("model_type", "llama"), "num_hidden_layers": layers,
            "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": inter, "vocab_size": vocab, "max_position_embeddings": ctx,
            "torch_dtype": dtype, **extra}


#: real geometries (from the models' published config.json files)
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": _llama("meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8192),
    "llama-3.1-8b": _llama("meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256, 131072),
    "llama-3-70b": _llama("meta-llama/Meta-Llama-3-70B", 80, 8192, 64, 8, 28672, 128256, 8192),
    "llama-3.2-1b": _llama("meta-llama/Llama-3.2-1B", 16, 2048, 32, 8, 8192, 128256, 131072, head_dim=64),
    "llama-2-7b": _llama("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000, 4096, dtype="float16"),
    "qwen2.5-7b": _llama("Qwen/Qwen2.5-7B", 28, 3584, 28, 4, 18944, 152064, 131072, model_type="qwen2"),
    "mistral-7b": _llama("mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 14336, 32000, 32768, model_type="mistral"),
    "deepseek-v3": {"_name_or_path": "deepseek-ai/DeepSeek-V3", "model_type": "deepseek_v3", "num_hidden_layers": 61,
                    "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
                    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
                    "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3,
                    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                    "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840,
                    "torch_dtype": "bfloat16"},
    "smollm2-135m": _llama("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 576, 9, 3, 1536, 49152, 8192,
                           dtype="float32", tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
}


def preset_config(name: str) -> dict[str, Any]:
    """The Hugging Face style config dict of a preset (a copy).

    Raises:
        ConfigError: the name is not a preset.
    """
    try:
        return dict(PRESETS[name.lower()])
    except KeyError:
        raise ConfigError(f"model preset: {name!r} is unknown; expected one of {', '.join(PRESETS)}") from None
