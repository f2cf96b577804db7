"""A small serving loop around a transformers causal LM that uses the OffloadManager.

Primitives:
- `HFEngine(model, manager, spec=None)`: `prefill(token_ids)` -> `Prefill` (next-token logits, the
  cache, what was restored, timings); `generate(token_ids, max_new_tokens)` -> `Generation` (greedy
  tokens, TTFT). With `manager=None` it is the plain model (the baseline).
- `Prefill`, `Generation`: results (frozen dataclasses).

What one prefill does (docs/design.md "Data flow"):
1. `manager.enqueue` + `manager.plan`: the matched prefix, the split s and the restore end r
   (a caller may adjust the plan: `plan_fn`);
2. r is capped so that at least `min_suffix_tokens` tokens are computed (bitwise exactness in
   float32, see `kv.max_restorable_blocks`);
3. nothing to restore (the miss path): one plain pass over the whole prompt, no load, no buffer;
4. otherwise blocks [s, r) load into one `HFKVBuffer` allocated for r blocks while the model computes
   the front [0, s) on this thread (the load runs on the manager's worker: they overlap); the front's
   KV is copied into the buffer, which becomes the model's `DynamicCache` without a copy; the model
   then computes tokens [r*T, n) with a per-layer wait (`LayerWaitHooks` -> `loading.wait_layer(i)`),
   so decoder layer i waits only for layer i's KV;
5. `loading.wait()` says how many restored blocks arrived intact; if fewer than asked (a disk block
   failed its checks) the pass is discarded and the prompt recomputed from the first bad block on
   the intact prefix: never wrong KV;
6. the prompt's new full blocks are saved by `manager.store` on the manager's background worker,
   after the first token's logits exist (the save never delays the TTFT it follows).

Invariants: `kvtier.scheduler` imports without transformers (imported inside functions, through
`kv`, which needs torch only); the buffer a save reads is never written again by the model
(transformers' `DynamicLayer.update` concatenates into new tensors), so a save in flight reads
stable bytes while decoding goes on.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from kvtier.tiers.errors import ConfigError, SpecMismatchError, TransferError
from kvtier.tiers.spec import KVSpec

from kvtier.scheduler.engines.hf.kv import MIN_EXACT_SUFFIX_TOKENS, HFKVBuffer, LayerWaitHooks, max_restorable_blocks, spec_for_model

from kvtier.scheduler.engines.hf.generate import prefill

log = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass(frozen=True)
class Prefill:
    """The result of one prefill.

    Attributes:
        logits: next-token logits of the last prompt position, `[vocab]`.
        cache: the transformers cache holding the whole prompt's KV.
        num_tokens: prompt tokens n.
        restored_tokens: leading tokens whose KV came from kvtier (intact blocks x block_tokens).
        front_tokens: leading tokens recomputed beside the load (the plan's [0, s)).
        computed_tokens: tokens the model ran over (front + suffix, + any recompute after a failure).
        failed_blocks: restored blocks that failed their checks (recomputed).
        plan: the plan followed (None without a manager).
        seconds: wall time of the prefill (the TTFT, without sampling).
        request_id: the request's id in the manager.
        timings: seconds of the parts: `front_s` (front pass + its copy into the buffer), `suffix_s`
            (the suffix pass with its per-layer waits).
    """

    logits: torch.Tensor
    cache: Any
    num_tokens: int
    restored_tokens: int = 0
    front_tokens: int = 0
    computed_tokens: int = 0
    failed_blocks: int = 0
    plan: Any = None
    seconds: float = 0.0
    request_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    """Greedy tokens after a prompt, with the prefill that led to them.

    Attributes:
        tokens: the new token ids, `[max_new_tokens]` int64.
        ttft_s: seconds from the call to the first token.
        prefill: the `Prefill` (what was restored).
    """

    tokens: torch.Tensor
    ttft_s: float
    prefill: Prefill


class HFEngine:
    """A transformers causal LM served with kvtier: restore cached prefixes, store new ones.

    Args:
        model: a transformers causal LM (eval mode; `eager` or `attention.exact_attention`
            attention keeps restores bitwise exact in float32).
        manager: the `OffloadManager` (None: the plain model, for baselines).
        spec: the manager's spec (default `manager.spec`); it must describe this model's KV.
        min_suffix_tokens: the fewest tokens computed after a restored prefix (see
            `kv.max_restorable_blocks`).
        store: save the prompts' new full blocks after each prefill.

    Raises:
        SpecMismatchError: `spec`'s geometry or dtype is not this model's.
    """

    def __init__(self, model: Any, manager: Any = None, *, spec: KVSpec | None = None,
                 min_suffix_tokens: int = MIN_EXACT_SUFFIX_TOKENS, store: bool = True) -> None:
        self.model = model
        self.manager = manager
        self.spec = spec or (manager.spec if manager is not None else None)
        if self.spec is not None:
            own = spec_for_model(model, self.spec.weights_revision, self.spec.block_tokens, model_id=self.spec.model_id)
            if own.fingerprint != self.spec.fingerprint:
                raise SpecMismatchError(f"spec: {self.spec} does not describe this model's KV ({own})")
        if min_suffix_tokens < 1:
            raise ConfigError(f"min_suffix_tokens: expected >= 1, got {min_suffix_tokens!r}")
        self.min_suffix_tokens = min_suffix_tokens
        self.store_prompts = store
        self._scratch: HFKVBuffer | None = None

    def _buffer(self, num_tokens: int) -> HFKVBuffer:
        """The restore buffer, reused across prefills (a fresh 100 MB allocation costs its page faults on
        every restore: ~10 ms on CPU). Safe to reuse: once a prefill returns, its cache holds the
        concatenated copies that `DynamicLayer.update` made, never this buffer."""
        if self._scratch is None or self._scratch.num_tokens < num_tokens:
            self._scratch = None
            # on the model's device: a model on CUDA reads its restored KV there (a CPU buffer failed there)
            self._scratch = HFKVBuffer.allocate(self.spec, num_tokens, device=_model_device(self.model))
        return self._scratch

    # -- prefill ---------------------------------------------------------------------------------

    def prefill(self, token_ids: Sequence[int] | torch.Tensor, *, request_id: str | None = None,
                plan_fn: Callable[[Any], Any] | None = None, finish: bool = True) -> Prefill:
        """Makes the prompt's KV ready and returns the next-token logits.

        Args:
            token_ids: the prompt, `[n]` (n >= 1).
            request_id: the manager's id for it (default: a fresh one).
            plan_fn: maps the manager's plan to the plan to follow (tests and benchmarks force splits
                with `dataclasses.replace`); it must keep 0 <= split <= restore_stop <= matched blocks.
            finish: tell the manager the request is done once its save is submitted.

        Returns:
            A `Prefill`.

        Raises:
            ConfigError: empty prompt, or a plan from `plan_fn` out of range.
        """
        start = time.perf_counter()
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        n = int(ids.numel())
        if n == 0:
            raise ConfigError("token_ids: expected at least one token, got none")
        if self.manager is None:
            logits, cache = prefill(self.model, ids)
            return Prefill(logits, cache, n, computed_tokens=n, seconds=time.perf_counter() - start)
        rid = request_id or f"hf-{next(_ids)}"
        manager, T = self.manager, self.spec.block_tokens
        manager.enqueue(rid, ids)
        plan = manager.plan(rid)
        if plan_fn is not None:
            plan = plan_fn(plan)
            if not 0 <= plan.split <= plan.restore_stop <= plan.num_matched_blocks:
                manager.cancel(rid)
                raise ConfigError(f"plan_fn: split {plan.split}, restore_stop {plan.restore_stop} outside "
                                  f"0 <= s <= r <= {plan.num_matched_blocks}")
        cap = max_restorable_blocks(n, T, self.min_suffix_tokens)
        if plan.restore_stop > cap:
            plan = replace(plan, split=min(plan.split, cap), restore_stop=cap)
        if plan.restore_stop <= plan.split:  # the miss path: nothing restored, one plain pass
            manager.load(rid, None, replace(plan, split=0, restore_stop=0))  # books: the request runs
            logits, cache = prefill(self.model, ids)
            result = Prefill(logits, cache, n, computed_tokens=n, plan=plan, request_id=rid,
                             seconds=time.perf_counter() - start)
        else:
            try:
                result = self._restore_and_compute(rid, ids, plan, start)
            except BaseException:
                manager.finish(rid)
                raise
        self._store(rid, ids, result.cache, finish)
        return result

    def _restore_and_compute(self, rid: str, ids: torch.Tensor, plan: Any, start: float) -> Prefill:
        manager, T = self.manager, self.spec.block_tokens
        s, r = plan.split, plan.restore_stop
        n = int(ids.numel())
        buffer = self._buffer(r * T)
        loading = manager.load(rid, buffer, plan)
        r = loading.restore_stop  # a block may have vanished before the load started
        timings: dict[str, float] = {}
        if s > 0:  # the front, computed while [s, r) loads
            t0 = time.perf_counter()
            _, front = prefill(self.model, ids[:s * T])
            for layer, (k, v) in enumerate(zip(buffer.keys, buffer.values)):
                k[:, :, :s * T].copy_(front.layers[layer].keys)
                v[:, :, :s * T].copy_(front.layers[layer].values)
            timings["front_s"] = time.perf_counter() - t0
        computed = s * T
        if r <= s:  # nothing restored after all
            logits, cache = prefill(self.model, ids[s * T:], buffer.to_cache(s * T) if s else None)
            return Prefill(logits, cache, n, front_tokens=s * T, computed_tokens=n, plan=plan, request_id=rid,
                           seconds=time.perf_counter() - start, timings=timings)
        t0 = time.perf_counter()
        try:
            with LayerWaitHooks(self.model, loading.wait_layer):
                logits, cache = prefill(self.model, ids[r * T:], buffer.to_cache(r * T))
            intact = loading.wait()
        except TransferError as err:  # the load is late or broke: give up on it, recompute after the front
            log.warning("request %s: %s; recomputing the restored blocks", rid, err)
            self._scratch = None  # the late load may still write into it
            logits, cache = prefill(self.model, ids[s * T:], buffer.to_cache(s * T) if s else None)
            return Prefill(logits, cache, n, front_tokens=s * T, computed_tokens=n, failed_blocks=r - s, plan=plan,
                           request_id=rid, seconds=time.perf_counter() - start, timings=timings)
        timings["suffix_s"] = time.perf_counter() - t0
        computed += n - r * T
        failed = (r - s) - intact
        if failed:  # a block failed its checks: recompute from it on the intact prefix, never wrong KV
            good = s + intact
            log.info("request %s: %d restored block(s) failed their checks; recomputing from block %d",
                     rid, failed, good)
            logits, cache = prefill(self.model, ids[good * T:], buffer.to_cache(good * T) if good else None)
            computed += n - good * T
            r = good
        return Prefill(logits, cache, n, restored_tokens=(r - s) * T, front_tokens=s * T, computed_tokens=computed,
                       failed_blocks=failed, plan=plan, request_id=rid, seconds=time.perf_counter() - start,
                       timings=timings)

    def _store(self, rid: str, ids: torch.Tensor, cache: Any, finish: bool) -> None:
        manager = self.manager
        try:
            if self.store_prompts and int(ids.numel()) >= self.spec.block_tokens:
                manager.store(rid, ids, HFKVBuffer.from_cache(cache, self.spec))
        finally:
            if finish:
                manager.finish(rid)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, token_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
                 request_id: str | None = None, plan_fn: Callable[[Any], Any] | None = None,
                 store_output: bool = False) -> Generation:
        """Prefill (restoring what is cached), then greedy decoding.

        With `store_output`, the full blocks of prompt + generated tokens are saved too once decoding
        ends (a chat's next turn then restores the reply as well as the prompt).

        Returns:
            A `Generation`: `max_new_tokens` greedy tokens and the TTFT.

        Raises:
            ConfigError: `max_new_tokens` < 1 or an empty prompt.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: expected >= 1, got {max_new_tokens!r}")
        start = time.perf_counter()
        result = self.prefill(token_ids, request_id=request_id, plan_fn=plan_fn, finish=not store_output)
        token = int(torch.argmax(result.logits))
        ttft = time.perf_counter() - start
        out, cache = [token], result.cache
        while len(out) < max_new_tokens:
            logits, cache = prefill(self.model, [token], cache)
            token = int(torch.argmax(logits))
            out.append(token)
        tokens = torch.tensor(out, dtype=torch.long)
        if store_output and self.manager is not None:  # the cache holds every token but the last one
            seen = torch.cat([torch.as_tensor(token_ids, dtype=torch.long).reshape(-1), tokens[:-1]])
            self._store(result.request_id, seen, cache, finish=True)
        return Generation(tokens, ttft, result)


#: the issue's name for the serving loop
KVTierGenerator = HFEngine


def _model_device(model: Any) -> torch.device:
    """Where a model's weights live (CPU for a model without parameters)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
