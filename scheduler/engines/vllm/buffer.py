"""vLLM's paged KV as a kvtier `KVBuffer`, and the `KVSpec` of a vLLM engine.

Primitives:
- `vllm_spec(vllm_config)`: the KVSpec of the engine's model: geometry from the HF config,
  `block_tokens` = vLLM's block size, layout `vllm-cpu-<isa>/1`, `weights_revision` of the model
  directory (read from its `kvtier.json` marker when `kvtier models prepare` made it, else hashed);
- `VllmKVBuffer(spec, kv_caches)`: implements `write_blocks` / `read_blocks` over the per-layer paged
  KV tensors vLLM hands `register_kv_caches`.

Invariants:
- a kvtier block in this layout is `num_layers` pages, one per layer, each the exact byte image of
  `kv_caches[layer][block]` (vLLM's CPU page: `[num_kv_heads][2 * block_tokens][head_dim]`, K then
  V per head); the page's inner order is vLLM's business, named in the layout so it enters the
  fingerprint and never mixes with another engine's blocks;
- copies are one `memmove` per page (196,608 B for SmolLM2 at 128 tokens), straight between a pool
  slot and vLLM's page: no staging, no fresh allocation. A CUDA tensor goes through `copy_`.
"""

from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import KVSpec

log = logging.getLogger(__name__)

#: the layout name of vLLM's CPU page order (`<isa>` is filled in)
LAYOUT_FORMAT = "vllm-{device}-{isa}/1"


def _attn_isa(dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return str(_get_attn_isa(dtype, block_size, head_dim))
    except Exception:  # an older or a CUDA build: the name only has to be stable per engine kind
        return "vec"


def weights_revision(model_dir: str) -> tuple[str, str | None]:
    """(weights revision, model id or None) of a model directory, from `kvtier.json` if present."""
    marker = Path(model_dir) / "kvtier.json"
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            if data.get("weights_revision"):
                return str(data["weights_revision"]), data.get("model_id")
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s); hashing the weights instead", marker, err)
    from kvtier.scheduler.engines.models import weights_revision_of

    return weights_revision_of(model_dir), None


def vllm_spec(vllm_config: Any) -> KVSpec:
    """The KVSpec of the model a vLLM engine runs (same on the scheduler and the worker side)."""
    model_config = vllm_config.model_config
    block_tokens = int(vllm_config.cache_config.block_size)
    dtype = model_config.dtype
    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    if cache_dtype not in ("auto", None):
        raise ConfigError(f"cache_dtype: {cache_dtype!r}; kvtier's connector supports the model dtype ('auto') only")
    revision, model_id = weights_revision(model_config.model)
    hf = model_config.hf_config
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    device = "cpu" if not torch.cuda.is_available() else "cuda"
    isa = _attn_isa(dtype, block_tokens, head_dim) if device == "cpu" else "flash"
    return KVSpec.from_hf_config(hf, model_id=model_id or str(model_config.served_model_name or model_config.model),
                                 weights_revision=revision, dtype=str(dtype).removeprefix("torch."),
                                 block_tokens=block_tokens, layout=LAYOUT_FORMAT.format(device=device, isa=isa))


class VllmKVBuffer:
    """vLLM's paged KV (one tensor per attention layer) as a kvtier `KVBuffer`.

    Args:
        spec: the engine's KVSpec (`vllm_spec`).
        kv_caches: layer name -> that layer's paged KV, in layer order (`register_kv_caches`): each
            `[num_blocks, ...]` with one contiguous page of `spec.layer_bytes` per block.

    Raises:
        ConfigError: the number of layers or the page size does not match the spec.
    """

    def __init__(self, spec: KVSpec, kv_caches: Mapping[str, torch.Tensor]) -> None:
        self.spec = spec
        self.names = list(kv_caches)
        self.tensors = [kv_caches[n] for n in self.names]
        if len(self.tensors) != spec.num_layers:
            raise ConfigError(f"kv_caches: {len(self.tensors)} layers, expected {spec.num_layers} (the model's)")
        self.page_bytes = spec.layer_bytes
        t0 = self.tensors[0]
        page = t0[0].numel() * t0.element_size()
        if page != self.page_bytes or any(not t.is_contiguous() for t in self.tensors):
            raise ConfigError(f"kv_caches: pages of {page} B (contiguous: {t0.is_contiguous()}), expected "
                              f"{self.page_bytes} B per block and layer for {spec.model_id}")
        self.num_blocks = int(t0.shape[0])
        self.on_cpu = t0.device.type == "cpu"
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.layer_index = {name: i for i, name in enumerate(self.names)}

    def _check(self, blocks: Sequence[int]) -> None:
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if bad:
            raise ConfigError(f"vLLM block ids {bad[:4]} outside [0, {self.num_blocks})")

    def write_blocks(self, dst_blocks: Sequence[int], src: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of blocks `src` ([n, hi - lo, ...]) into vLLM blocks `dst_blocks`."""
        lo, hi = layers
        self._check(dst_blocks)
        if not self.on_cpu or src.device.type != "cpu":
            for i, b in enumerate(dst_blocks):
                for layer in range(lo, hi):
                    self.tensors[layer][b].view(-1).copy_(src[i, layer - lo].reshape(-1), non_blocking=True)
            return
        move = ctypes.memmove
        for d, s, n in self.write_chunks(dst_blocks, src, layers) or ():
            move(d, s, n)

    def write_chunks(self, dst_blocks: Sequence[int], src: torch.Tensor,
                     layers: tuple[int, int]) -> list[tuple[int, int, int]] | None:
        """The (dst address, src address, bytes) pages `write_blocks` copies, layer by layer, for a copier that
        spreads them over threads (`kvbuffer.write_pieces`); None unless both sides are in CPU memory.

        Raises:
            ConfigError: a block id outside vLLM's paged KV.
        """
        if not self.on_cpu or src.device.type != "cpu":
            return None
        lo, hi = layers
        self._check(dst_blocks)
        page = self.page_bytes
        s_ptr, s_block = src.data_ptr(), src.stride(0) * src.element_size()
        s_layer = src.stride(1) * src.element_size()
        return [(self.ptrs[layer] + b * page, s_ptr + (layer - lo) * s_layer + i * s_block, page)
                for layer in range(lo, hi) for i, b in enumerate(dst_blocks)]

    def read_blocks(self, src_blocks: Sequence[int], dst: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of vLLM blocks `src_blocks` into `dst` ([n, hi - lo, ...])."""
        lo, hi = layers
        self._check(src_blocks)
        if not self.on_cpu or dst.device.type != "cpu":
            for i, b in enumerate(src_blocks):
                for layer in range(lo, hi):
                    dst[i, layer - lo].view(-1).copy_(self.tensors[layer][b].reshape(-1), non_blocking=True)
            return
        page = self.page_bytes
        d_ptr, d_block = dst.data_ptr(), dst.stride(0) * dst.element_size()
        d_layer = dst.stride(1) * dst.element_size()
        move = ctypes.memmove
        for i, b in enumerate(src_blocks):
            for layer in range(lo, hi):
                move(d_ptr + i * d_block + (layer - lo) * d_layer, self.ptrs[layer] + b * page, page)
