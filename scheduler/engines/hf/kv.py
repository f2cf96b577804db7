"""The bridge between Hugging Face transformers' KV cache and kvtier blocks.

Primitives:
- `spec_for_model(model, weights_revision, block_tokens)`: the `KVSpec` of a loaded causal LM.
- `HFKVBuffer`: the per-layer K and V tensors of one sequence (`[1, num_kv_heads, num_tokens,
  head_dim]`, as transformers' `DynamicLayer` holds them), seen as kvtier blocks: engine block i is
  tokens [i*T, (i+1)*T). Implements the `KVBuffer` protocol of `kvtier.tiers.transfer`
  (`write_blocks`, `read_blocks`). `allocate` makes one for a known prefix length (one allocation),
  `to_cache` hands exactly those tensors to a `DynamicCache` (no copy), `from_cache` wraps the cache
  of a finished prefill so its blocks can be saved.
- `LayerWaitHooks(model, wait_fn)`: forward pre-hooks that call `wait_fn(i)` before decoder layer i
  runs, so layer i waits only for layer i's KV (layer-wise overlap of restore and compute).
- `max_restorable_blocks`: how many leading blocks may be restored so that the suffix pass stays
  bitwise equal to recomputing the whole prompt (see below).

Invariants:
- a run of consecutive blocks moves as runs of `block_tokens x head_dim` contiguous elements on both
  sides (the docs/design.md layout has heads before tokens, as `DynamicLayer` does), never a transpose of
  the inner dimensions: one `copy_` per run for a buffer from `allocate` (all its layers are one
  tensor), one per layer per K/V per run for a buffer wrapping a cache (`from_cache`). One call is
  both faster and steadier on a busy machine: each `copy_` is a parallel region whose threads must
  all be scheduled (measured for 2,048 tokens of SmolLM2: ~1.4x a plain memcpy against ~3x for 60
  calls);
- `to_cache` makes no copy: the cache's layers hold the buffer's tensors (transformers' own
  `DynamicLayer.update` then concatenates new tokens onto them, which copies, as it does for any
  `DynamicCache`);
- nothing here imports transformers at module level: `kvtier.scheduler` imports without it.

Exactness (float32, CPU, measured with torch 2.13 / MKL 2024.2 / transformers 5.19): the suffix pass
over a restored prefix gives logits bitwise equal to the whole-prompt pass only when (a) attention is
`eager` (SDPA's CPU flash kernel splits the KV length by the query length, so its sums change with the
split) and (b) the suffix is at least 12 tokens long (MKL's sgemm takes another kernel for 1-3, 5-7
and 9-11 rows, which rounds differently). `max_restorable_blocks` keeps the suffix at
`min_suffix_tokens` (16 by default) or more by recomputing one more block when needed.

transformers' cache API, as of 5.19 (the reasons for what `to_cache` does):
- `DynamicCache(ddp_cache_data)` fills layers through `update`, which concatenates onto an empty
  tensor (a copy): `to_cache` sets each `DynamicLayer`'s `keys` / `values` directly instead;
- `DynamicLayer.update` concatenates on every forward call, so the first suffix pass copies the
  restored prefix once (and every decode step copies the whole cache), exactly as for a cache the
  model built itself;
- Llama's forward takes no `cache_position`: positions come from `position_ids` or from
  `past_key_values.get_seq_length()`; `prefill` passes `position_ids` explicitly;
- `crop(n)` removes -n tokens for n < 0; a positive n is the deprecated "keep n tokens".
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Callable, Sequence

import torch

from kvtier.tiers.errors import ConfigError, SpecMismatchError
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.copies import copy_tensor
from kvtier.tiers.kvbuffer import slot_runs

log = logging.getLogger(__name__)

#: the shortest suffix (tokens computed after a restored prefix) that keeps float32 logits bitwise
#: equal to a whole-prompt pass on CPU (MKL sgemm rounds differently below 12 rows)
MIN_EXACT_SUFFIX_TOKENS = 16


def spec_for_model(model: Any, weights_revision: str, block_tokens: int = 64, *,
                   model_id: str | None = None) -> KVSpec:
    """The KVSpec of a loaded transformers causal LM.

    Args:
        model: a transformers model (its `config` gives the geometry).
        weights_revision: identity of the weights (docs/design.md: 16 hex digits of the weight files'
            sha256, or `random-<seed>`).
        block_tokens: tokens per block.
        model_id: the model's name; defaults to the config's `_name_or_path`.

    Returns:
        The spec, with `dtype` taken from the model's parameters (what its KV will be).

    Raises:
        ConfigError: the model has no parameters or its config lacks the geometry.
    """
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:
        raise ConfigError("model: has no parameters, cannot tell the dtype of its KV") from None
    return KVSpec.from_hf_config(model.config, model_id=model_id or getattr(model.config, "_name_or_path", None),
                                 weights_revision=weights_revision, dtype=dtype, block_tokens=block_tokens)


def max_restorable_blocks(prompt_tokens: int, block_tokens: int,
                          min_suffix_tokens: int = MIN_EXACT_SUFFIX_TOKENS) -> int:
    """The most leading blocks of a prompt that may be restored while computing at least
    `min_suffix_tokens` tokens (or the whole prompt, if it is shorter).

    At least one token is always computed: the next-token logits come from it.
    """
    if prompt_tokens < 0 or block_tokens <= 0 or min_suffix_tokens < 1:
        raise ConfigError(f"max_restorable_blocks: expected prompt_tokens >= 0, block_tokens > 0, "
                          f"min_suffix_tokens >= 1; got {prompt_tokens}, {block_tokens}, {min_suffix_tokens}")
    return max(0, (prompt_tokens - min_suffix_tokens) // block_tokens)


class HFKVBuffer:
    """The KV of one sequence as transformers holds it, addressed as kvtier blocks.

    Args:
        spec: the model's KV geometry (`kv_factor` 2).
        keys: one tensor per layer, `[1, num_kv_heads, num_tokens, head_dim]`.
        values: the same for V.
        storage: the one tensor `keys` and `values` are views of, when there is one (`allocate`).

    Raises:
        SpecMismatchError: a tensor's shape or dtype does not match `spec`, or the layers disagree
            on the number of tokens.
    """

    def __init__(self, spec: KVSpec, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                 storage: torch.Tensor | None = None) -> None:
        if spec.kv_factor != 2:
            raise ConfigError(f"HFKVBuffer: expected a spec with kv_factor 2 (K and V), got {spec.kv_factor}")
        if len(keys) != spec.num_layers or len(values) != spec.num_layers:
            raise SpecMismatchError(f"HFKVBuffer: expected {spec.num_layers} layers of K and V, "
                                    f"got {len(keys)} and {len(values)}")
        num_tokens = keys[0].shape[2] if keys[0].dim() == 4 else -1
        want = (1, spec.num_kv_heads, num_tokens, spec.head_dim)
        for name, tensors in (("keys", keys), ("values", values)):
            for layer, t in enumerate(tensors):
                if tuple(t.shape) != want or t.dtype != spec.torch_dtype:
                    raise SpecMismatchError(f"HFKVBuffer: {name}[{layer}] is {tuple(t.shape)} {t.dtype}; expected "
                                            f"{want} {spec.torch_dtype} (batch 1, heads, tokens, head_dim)")
        self.spec = spec
        self.keys = list(keys)
        self.values = list(values)
        self.num_tokens = num_tokens
        #: all layers' K and V in one tensor (from `allocate`), or None when the tensors are separate
        self.storage = storage

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def allocate(cls, spec: KVSpec, num_tokens: int, device: torch.device | str = "cpu") -> "HFKVBuffer":
        """A buffer for `num_tokens` tokens, in one allocation (contents undefined until written).

        Each layer's K (and V) is one contiguous `[1, heads, num_tokens, head_dim]` tensor, a view
        of the single allocation.
        """
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ConfigError(f"HFKVBuffer.allocate: num_tokens must be a positive int, got {num_tokens!r}")
        storage = torch.empty((spec.num_layers, 2, 1, spec.num_kv_heads, num_tokens, spec.head_dim),
                              dtype=spec.torch_dtype, device=device)
        return cls(spec, [storage[i, 0] for i in range(spec.num_layers)],
                   [storage[i, 1] for i in range(spec.num_layers)], storage=storage)

    @classmethod
    def from_cache(cls, cache: Any, spec: KVSpec) -> "HFKVBuffer":
        """Wraps the tensors of a transformers cache (after a prefill) without copying them.

        Raises:
            ConfigError: the cache has no `layers` (a transformers release before the cache-layer API)
                or a layer is empty.
            SpecMismatchError: the cache's tensors do not match `spec`.
        """
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise ConfigError(f"cache: {type(cache).__name__} has no 'layers'; kvtier needs transformers' "
                              f"cache-layer API (DynamicCache with DynamicLayer)")
        if len(layers) != spec.num_layers or any(getattr(layer, "keys", None) is None for layer in layers):
            raise ConfigError(f"cache: expected {spec.num_layers} filled layers, got {len(layers)} "
                              f"(run a prefill first)")
        return cls(spec, [layer.keys for layer in layers], [layer.values for layer in layers])

    # -- geometry -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Full blocks the buffer holds."""
        return self.num_tokens // self.spec.block_tokens

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.keys[0].device

    # -- KVBuffer protocol ----------------------------------------------------------------------

    def write_blocks(self, dst_blocks: Sequence[int], src: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of `len(dst_blocks)` blocks from `src` into this sequence.

        Args:
            dst_blocks: the sequence's block indices (block i = tokens [i*T, (i+1)*T)).
            src: `[n, hi - lo, 2, num_kv_heads, T, head_dim]`, block j of it goes to `dst_blocks[j]`.
            layers: (lo, hi).

        Raises:
            SpecMismatchError: `src` has the wrong shape or dtype.
            ConfigError: a block index or the layer range is out of range.
        """
        for j0, b0, _, n in self._runs(dst_blocks, src, layers, "src"):
            if self.storage is not None:  # one copy for all layers and K/V of the run
                copy_tensor(self._storage_view(b0, n, layers), src[j0:j0 + n].permute(1, 2, 3, 0, 4, 5))
                continue
            for layer in range(*layers):
                for kv, tensors in enumerate((self.keys, self.values)):
                    copy_tensor(self._block_view(tensors[layer], b0, n),
                                src[j0:j0 + n, layer - layers[0], kv].transpose(0, 1))

    def read_blocks(self, src_blocks: Sequence[int], dst: torch.Tensor, layers: tuple[int, int]) -> None:
        """Copies layers [lo, hi) of this sequence's blocks `src_blocks` into `dst` (the reverse of
        `write_blocks`; `dst` is `[n, hi - lo, 2, num_kv_heads, T, head_dim]`)."""
        for j0, b0, _, n in self._runs(src_blocks, dst, layers, "dst"):
            if self.storage is not None:
                copy_tensor(dst[j0:j0 + n].permute(1, 2, 3, 0, 4, 5), self._storage_view(b0, n, layers))
                continue
            for layer in range(*layers):
                for kv, tensors in enumerate((self.keys, self.values)):
                    copy_tensor(dst[j0:j0 + n, layer - layers[0], kv].transpose(0, 1),
                                self._block_view(tensors[layer], b0, n))

    def _storage_view(self, b0: int, n: int, layers: tuple[int, int]) -> torch.Tensor:
        """Blocks [b0, b0+n) of layers [lo, hi) of the single allocation, as `[hi - lo, 2, heads, n, T,
        head_dim]` (a view)."""
        T = self.spec.block_tokens
        return self.storage[layers[0]:layers[1], :, 0, :, b0 * T:(b0 + n) * T].unflatten(3, (n, T))

    def _block_view(self, t: torch.Tensor, b0: int, n: int) -> torch.Tensor:
        """Tokens of blocks [b0, b0+n) of one layer's K or V as `[heads, n, T, head_dim]` (a view)."""
        T = self.spec.block_tokens
        return t[0, :, b0 * T:(b0 + n) * T].unflatten(1, (n, T))

    def _runs(self, blocks: Sequence[int], data: torch.Tensor, layers: tuple[int, int],
              name: str) -> list[tuple[int, int, int, int]]:
        lo, hi = layers
        if not 0 <= lo < hi <= self.spec.num_layers:
            raise ConfigError(f"layers: expected a range within [0, {self.spec.num_layers}), got {layers!r}")
        s = self.spec
        want = (len(blocks), hi - lo, 2, s.num_kv_heads, s.block_tokens, s.head_dim)
        if tuple(data.shape) != want or data.dtype != s.torch_dtype:
            raise SpecMismatchError(f"{name}: is {tuple(data.shape)} {data.dtype}; expected {want} {s.torch_dtype}")
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if bad:
            raise ConfigError(f"blocks: {bad[:5]} outside this sequence's {self.num_blocks} full blocks "
                              f"({self.num_tokens} tokens)")
        return slot_runs(list(blocks)) if blocks else []

    # -- to transformers ------------------------------------------------------------------------

    def to_cache(self, num_tokens: int | None = None, config: Any = None) -> Any:
        """A transformers `DynamicCache` whose layers hold this buffer's tensors (no copy).

        Args:
            num_tokens: keep only the first `num_tokens` tokens (views), e.g. when the restore of a
                later block failed and the engine recomputes from there; default all.
            config: the model's config; when given, it is checked that every layer is a plain
                full-attention layer (a sliding-window or other layer kind is refused).

        Returns:
            The cache, ready for `model(input_ids=suffix, past_key_values=cache, ...)`; its
            `get_seq_length()` is `num_tokens`, which transformers uses for the suffix's positions.

        Raises:
            ConfigError: `num_tokens` is out of range, or a layer of `config` is not full attention.
        """
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        n = self.num_tokens if num_tokens is None else num_tokens
        if not 0 <= n <= self.num_tokens:
            raise ConfigError(f"num_tokens: expected 0..{self.num_tokens}, got {num_tokens!r}")
        if config is not None:
            kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers}
            if kinds - {DynamicLayer.__name__}:
                raise ConfigError(f"config: layers of kind {sorted(kinds)}; kvtier restores only full-attention "
                                  f"layers ({DynamicLayer.__name__})")
        cache = DynamicCache()
        if n == 0:
            return cache
        for k, v in zip(self.keys, self.values):
            layer = DynamicLayer()
            k, v = (k, v) if n == self.num_tokens else (k[:, :, :n], v[:, :, :n])
            layer.lazy_initialization(k, v)  # sets dtype, device and is_initialized
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        return cache


class LayerWaitHooks:
    """Calls `wait_fn(i)` right before decoder layer i runs, for every forward pass while active.

    Use as a context manager (the hooks are registered on construction and removed on exit, or by
    `close()`), e.g. `with LayerWaitHooks(model, lambda i: handle.wait_layer(i, timeout=10)): ...`.

    Args:
        model: a transformers causal LM (`model.model.layers`) or its base model (`model.layers`).
        wait_fn: called with the layer index; it may block, and an exception it raises aborts the
            forward pass.

    Raises:
        ConfigError: the model has no list of decoder layers where expected.
    """

    def __init__(self, model: Any, wait_fn: Callable[[int], None]) -> None:
        self._handles = [layer.register_forward_pre_hook(_LayerHook(i, wait_fn))
                         for i, layer in enumerate(decoder_layers(model))]

    def close(self) -> None:
        """Removes the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "LayerWaitHooks":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _LayerHook:
    __slots__ = ("layer", "wait_fn")

    def __init__(self, layer: int, wait_fn: Callable[[int], None]) -> None:
        self.layer, self.wait_fn = layer, wait_fn

    def __call__(self, module: Any, args: Any) -> None:
        self.wait_fn(self.layer)


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The decoder layers of a transformers causal LM, in order.

    Raises:
        ConfigError: neither `model.model.layers` nor `model.layers` exists.
    """
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError(f"model: {type(model).__name__} has no decoder layer list (model.model.layers or model.layers)")
