"""The minimal model calls a serving loop and the benchmarks need: `prefill` and `greedy_generate`.

Nothing here imports transformers at module level.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kvtier.tiers.errors import ConfigError


def prefill(model: Any, input_ids: torch.Tensor | Sequence[int], cache: Any = None) -> tuple[torch.Tensor, Any]:
    """Runs the model over tokens that follow what `cache` holds.

    Args:
        model: a transformers causal LM.
        input_ids: the new tokens, `[S]` or `[1, S]` (at least one).
        cache: a transformers cache holding the earlier tokens, or None for an empty one.

    Returns:
        (logits of the last position, `[vocab]`, the cache, now holding the new tokens too). Only the
        last position's logits are computed (`logits_to_keep=1`).
    """
    from transformers import DynamicCache

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ConfigError(f"input_ids: expected [S] or [1, S] with S >= 1, got shape {tuple(ids.shape)}")
    if cache is None:
        cache = DynamicCache(config=model.config)
    past = cache.get_seq_length()
    ids = ids.to(model.device)
    positions = torch.arange(past, past + ids.shape[1], device=ids.device).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.past_key_values


def greedy_generate(model: Any, input_ids: torch.Tensor | Sequence[int], cache: Any,
                    max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding: feeds `input_ids` (the tokens `cache` does not hold yet), then takes the arg-max
    token `max_new_tokens` times.

    Returns:
        The new token ids, `[max_new_tokens]` (int64). `cache` ends up holding all but the last one.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected >= 1, got {max_new_tokens!r}")
    logits, cache = prefill(model, input_ids, cache)
    out = []
    while True:
        token = int(torch.argmax(logits))
        out.append(token)
        if len(out) == max_new_tokens:
            return torch.tensor(out, dtype=torch.long)
        logits, cache = prefill(model, [token], cache)
