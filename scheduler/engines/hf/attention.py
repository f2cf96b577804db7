"""A split-invariant causal attention for transformers: restored prefixes stay bitwise exact.

Primitives:
- `exact_attention(chunk_tokens=64) -> str`: registers (once) an attention implementation with
  transformers' `AttentionInterface` and returns its name, to pass as
  `from_pretrained(..., attn_implementation=name)` or `config._attn_implementation`.

Why: a restored prefix of P tokens followed by a suffix pass must give the same logits, bit for bit,
as one pass over the whole prompt. Each row's attention must therefore be computed by the same
kernels on tensors of the same shapes in both cases. SDPA's CPU flash kernel picks its query and KV
tiling from the query length, so its sums change with the split; eager attention is split-invariant
but materialises `[heads, q, kv]` scores and a full float mask (about 2x slower than SDPA for a
2,048-token prefill on CPU). This implementation cuts the queries into chunks at multiples of
`chunk_tokens` in absolute position, and chunk [a, e) attends keys [0, e) only: the same shapes
whatever the split, as long as the split is a multiple of `chunk_tokens` (a multiple of the block
size, so choose `chunk_tokens` dividing `block_tokens`). GQA needs no `repeat_kv` copy: the query
heads of one KV head are stacked as rows of one matmul.

Invariants / limits:
- causal self-attention of one sequence (batch rows without padding); the mask transformers would
  build is skipped (a registered mask function returns None), so a padding mask is not supported;
- the softmax runs in float32, as in transformers' eager attention;
- linear layers are outside this module: a suffix shorter than 12 tokens still differs in the last
  bits on MKL (see `kv.MIN_EXACT_SUFFIX_TOKENS`).
"""

from __future__ import annotations

from typing import Any

import torch

_REGISTERED: set[str] = set()


def exact_attention(chunk_tokens: int = 64) -> str:
    """Registers the chunked causal attention for `chunk_tokens` and returns its implementation name.

    Raises:
        ValueError: `chunk_tokens` is not a positive int.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        from kvtier.tiers.errors import ConfigError

        raise ConfigError(f"chunk_tokens: expected a positive int, got {chunk_tokens!r}")
    name = f"kvtier_exact_{chunk_tokens}"
    if name not in _REGISTERED:
        AttentionInterface.register(name, _ChunkedAttention(chunk_tokens))
        AttentionMaskInterface.register(name, _no_mask)
        _REGISTERED.add(name)
    return name


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The attention below applies causality itself; no mask tensor is built."""
    return None


class _ChunkedAttention:
    """transformers attention-interface callable: (module, q, k, v, mask, scaling, ...) -> (out, None)."""

    def __init__(self, chunk_tokens: int) -> None:
        self.chunk_tokens = chunk_tokens

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        # query [b, heads, q, d]; key, value [b, kv_heads, kv, d] (the cache's tokens then the new ones)
        b, heads, q_len, d = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        groups = heads // kv_heads
        past = kv_len - q_len
        out = query.new_empty((b, q_len, heads, d))  # the layout transformers expects back
        q_grouped = query.view(b, kv_heads, groups, q_len, d)
        out_grouped = out.view(b, q_len, kv_heads, groups, d)
        start = past
        while start < kv_len:
            end = min((start // self.chunk_tokens + 1) * self.chunk_tokens, kv_len)
            rows = end - start
            q = q_grouped[:, :, :, start - past:end - past].reshape(b, kv_heads, groups * rows, d)
            scores = (torch.matmul(q, key[:, :, :end].transpose(2, 3)) * scaling).view(b, kv_heads, groups, rows, end)
            # within the chunk, row i (position start + i) sees keys up to start + i
            future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
            scores[..., start:end].masked_fill_(future, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            chunk_out = torch.matmul(probs.view(b, kv_heads, groups * rows, end), value[:, :, :end])
            out_grouped[:, start - past:end - past] = chunk_out.view(b, kv_heads, groups, rows, d).permute(0, 3, 1, 2, 4)
            start = end
        return out, None
