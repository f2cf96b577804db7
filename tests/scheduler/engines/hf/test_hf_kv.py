"""The transformers KV bridge: block layout, exact restores into a real (tiny, random) Llama, layer hooks.

Exactness is bitwise in float32 (eager attention, suffix of at least 16 tokens: see engines/hf/kv.py's module
docstring) and within a stated tolerance in bfloat16.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("transformers")

from kvtier.scheduler.engines.hf.kv import MIN_EXACT_SUFFIX_TOKENS, HFKVBuffer, LayerWaitHooks, max_restorable_blocks, spec_for_model

from kvtier.scheduler.engines.hf.generate import greedy_generate, prefill
from kvtier.scheduler.engines.models import build_random_llama  # noqa: E402
from kvtier.tiers.errors import ConfigError, SpecMismatchError  # noqa: E402
from kvtier.tiers.keys import KeyChain  # noqa: E402

pytestmark = pytest.mark.transformers

#: observed on this machine (torch 2.13 CPU, oneDNN): 0.0, bitwise equal, for bf16 and fp16, suffixes of
#: 1 to 20 tokens included (logits of magnitude ~0.5); the bound leaves room for other CPUs' kernels
BF16_LOGIT_ATOL = 0.02


def tokens(n: int, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def blocks_of(cache, spec, num_blocks: int) -> torch.Tensor:
    """The first `num_blocks` blocks of a finished prefill's cache, in the docs/design.md block layout."""
    out = torch.empty((num_blocks, *spec.block_shape), dtype=spec.torch_dtype)
    if num_blocks:
        HFKVBuffer.from_cache(cache, spec).read_blocks(range(num_blocks), out, (0, spec.num_layers))
    return out


def restored_cache(spec, blocks: torch.Tensor, num_groups: int = 2):
    """A fresh buffer written from block-layout tensors one layer group at a time, as a DynamicCache."""
    buffer = HFKVBuffer.allocate(spec, blocks.shape[0] * spec.block_tokens)
    for lo, hi in spec.layer_groups(num_groups):
        buffer.write_blocks(range(blocks.shape[0]), blocks[:, lo:hi], (lo, hi))
    return buffer, buffer.to_cache()


# -- spec and layout ------------------------------------------------------------------------------


def test_spec_for_model_reads_geometry_and_dtype(tiny_llama, tiny_llama_spec):
    spec = tiny_llama_spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype, spec.block_tokens) == (4, 2, 16, "float32", 16)
    assert spec.weights_revision == "random-0"
    # other weights of the same geometry must never share KV
    assert spec_for_model(tiny_llama, "random-1", 16).fingerprint != spec.fingerprint


@pytest.mark.parametrize("one_allocation", [True, False], ids=["allocated", "per-layer-tensors"])
def test_write_then_read_blocks_round_trips_in_block_layout(tiny_llama_spec, one_allocation):
    spec = tiny_llama_spec
    T, H, D = spec.block_tokens, spec.num_kv_heads, spec.head_dim
    if one_allocation:
        buffer = HFKVBuffer.allocate(spec, 5 * T)
    else:  # as a cache's layers hold them: separate tensors (the per-layer copy path)
        buffer = HFKVBuffer(spec, [torch.empty(1, H, 5 * T, D) for _ in range(4)],
                            [torch.empty(1, H, 5 * T, D) for _ in range(4)])
    buffer.keys[0].zero_()
    src = torch.arange(3 * spec.bytes_per_block // 4, dtype=torch.float32).view(3, *spec.block_shape)
    # blocks 3, 0, 1: two runs (3) and (0, 1)
    buffer.write_blocks([3, 0, 1], src, (0, spec.num_layers))
    # block j of src lands at tokens [b*T, (b+1)*T) of every layer's K (kv 0) and V (kv 1), heads first
    assert torch.equal(buffer.keys[2][0, :, 3 * T:4 * T], src[0, 2, 0])
    assert torch.equal(buffer.values[1][0, :, 0:T], src[1, 1, 1])
    assert torch.equal(buffer.values[3][0, :, T:2 * T], src[2, 3, 1])
    assert buffer.keys[0][0, :, 2 * T:3 * T].abs().sum() == 0  # block 2 untouched
    back = torch.empty_like(src)
    buffer.read_blocks([3, 0, 1], back, (0, spec.num_layers))
    assert torch.equal(back, src)
    assert back[0, 0, 0].shape == (H, T, D)


def test_to_cache_hands_over_the_buffer_tensors_without_copying(tiny_llama_spec):
    buffer = HFKVBuffer.allocate(tiny_llama_spec, 3 * tiny_llama_spec.block_tokens)
    cache = buffer.to_cache()
    assert cache.get_seq_length() == buffer.num_tokens
    assert all(layer.keys.data_ptr() == k.data_ptr() and layer.values.data_ptr() == v.data_ptr()
               for layer, k, v in zip(cache.layers, buffer.keys, buffer.values))
    assert buffer.to_cache(num_tokens=16).get_seq_length() == 16
    assert buffer.to_cache(num_tokens=0).get_seq_length() == 0


# -- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_tokens", [100, 3 * 16 + 16, 7 * 16 + 29])
def test_restored_prefix_gives_bitwise_equal_logits_and_greedy_continuation(tiny_llama, tiny_llama_spec,
                                                                            prompt_tokens):
    model, spec = tiny_llama, tiny_llama_spec
    ids = tokens(prompt_tokens)
    full_logits, full_cache = prefill(model, ids)
    full_greedy = greedy_generate(model, ids, None, 8)

    n = max_restorable_blocks(prompt_tokens, spec.block_tokens)
    assert n > 0 and prompt_tokens - n * spec.block_tokens >= MIN_EXACT_SUFFIX_TOKENS
    saved = blocks_of(full_cache, spec, n)  # what a pool slot would hold
    buffer, cache = restored_cache(spec, saved, num_groups=2)
    logits, _ = prefill(model, ids[n * spec.block_tokens:], cache)
    assert torch.equal(logits, full_logits)
    _, cache = restored_cache(spec, saved, num_groups=2)
    assert torch.equal(greedy_generate(model, ids[n * spec.block_tokens:], cache, 8), full_greedy)


def test_prompt_shorter_than_one_block_restores_nothing(tiny_llama, tiny_llama_spec):
    spec = tiny_llama_spec
    ids = tokens(spec.block_tokens - 3)
    full_logits, full_cache = prefill(tiny_llama, ids)
    assert max_restorable_blocks(len(ids), spec.block_tokens) == 0
    stored = HFKVBuffer.from_cache(full_cache, spec)
    assert stored.num_blocks == 0
    with pytest.raises(ConfigError, match=r"outside this sequence's 0 full blocks"):
        stored.read_blocks([0], torch.empty((1, *spec.block_shape)), (0, spec.num_layers))
    logits, _ = prefill(tiny_llama, ids, HFKVBuffer.allocate(spec, spec.block_tokens).to_cache(num_tokens=0))
    assert torch.equal(logits, full_logits)


def test_prompt_diverging_mid_block_reuses_only_the_full_blocks_before_it(tiny_llama, tiny_llama_spec):
    model, spec = tiny_llama, tiny_llama_spec
    T = spec.block_tokens
    first = tokens(6 * T, seed=2)
    # the second prompt shares 2.5 blocks with the first, then differs
    second = torch.cat([first[:2 * T + T // 2], tokens(4 * T, seed=3)])
    _, first_cache = prefill(model, first)
    saved = blocks_of(first_cache, spec, 6)
    chain = KeyChain.for_spec(spec)
    stored, asked = chain.keys(first), chain.keys(second)
    hits = next(i for i, (a, b) in enumerate(zip(stored, asked)) if a != b)
    assert hits == 2  # the block holding the divergence is not a hit

    want, _ = prefill(model, second)
    _, cache = restored_cache(spec, saved[:hits])
    got, _ = prefill(model, second[hits * T:], cache)
    assert torch.equal(got, want)
    # restoring the diverging block too would serve wrong KV: the check above is sensitive to it
    _, cache = restored_cache(spec, saved[:hits + 1])
    wrong, _ = prefill(model, second[(hits + 1) * T:], cache)
    assert not torch.equal(wrong, want)


@pytest.mark.parametrize("min_suffix_tokens", [1, MIN_EXACT_SUFFIX_TOKENS])
def test_bfloat16_restore_is_within_tolerance(min_suffix_tokens):
    model = build_random_llama(seed=0, dtype=torch.bfloat16)
    spec = spec_for_model(model, "random-0", block_tokens=16)
    assert spec.dtype == "bfloat16"
    ids = tokens(100)
    full_logits, full_cache = prefill(model, ids)
    n = max_restorable_blocks(len(ids), spec.block_tokens, min_suffix_tokens)
    _, cache = restored_cache(spec, blocks_of(full_cache, spec, n))
    logits, _ = prefill(model, ids[n * spec.block_tokens:], cache)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), full_logits.float(), atol=BF16_LOGIT_ATOL, rtol=0)


# -- layer-wise waits -----------------------------------------------------------------------------


def test_layer_hooks_run_once_per_layer_in_order_and_are_removed(tiny_llama):
    calls: list[int] = []
    with LayerWaitHooks(tiny_llama, calls.append):
        prefill(tiny_llama, tokens(20))
    assert calls == [0, 1, 2, 3]
    prefill(tiny_llama, tokens(20))
    assert calls == [0, 1, 2, 3]


def test_layer_i_waits_only_for_layer_i_while_later_layers_are_still_being_written(tiny_llama, tiny_llama_spec):
    model, spec = tiny_llama, tiny_llama_spec
    ids = tokens(5 * 16 + 20)
    want, full_cache = prefill(model, ids)
    saved = blocks_of(full_cache, spec, 5)
    buffer = HFKVBuffer.allocate(spec, 5 * 16)
    ready = [threading.Event() for _ in range(spec.num_layers)]
    started = [threading.Event() for _ in range(spec.num_layers)]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for layer in range(spec.num_layers):
                # layer l's KV is written only once the model has reached layer l - 1: the forward pass
                # can only finish if each layer waits for its own KV alone
                if layer > 0 and not started[layer - 1].wait(10):
                    raise TimeoutError(f"layer {layer - 1} never started")
                buffer.write_blocks(range(5), saved[:, layer:layer + 1], (layer, layer + 1))
                ready[layer].set()
        except BaseException as err:  # reported by the test below
            errors.append(err)

    def wait_for(layer: int) -> None:
        started[layer].set()
        if not ready[layer].wait(10):
            raise TimeoutError(f"layer {layer} KV never arrived")

    thread = threading.Thread(target=writer, name="test-writer")
    cache = buffer.to_cache()
    thread.start()
    try:
        with LayerWaitHooks(model, wait_for):
            got, _ = prefill(model, ids[5 * 16:], cache)
    finally:
        thread.join(10)
    assert not errors and not thread.is_alive()
    assert torch.equal(got, want)


def test_save_and_load_through_the_transferer_with_layer_waits(tiny_llama, tiny_llama_spec):
    """The KVBuffer protocol used by kvtier's own Transferer and a host pool."""
    from kvtier.tiers.pool import HostTier
    from kvtier.tiers.tier import TierName
    from kvtier.tiers.transfer import Transferer

    model, spec = tiny_llama, tiny_llama_spec
    ids = tokens(6 * 16 + 16, seed=4)
    want, full_cache = prefill(model, ids)
    keys = KeyChain.for_spec(spec).keys(ids[:6 * 16])
    host = HostTier(spec, 8 * spec.bytes_per_block)
    transferer = Transferer({TierName.HOST: host})
    try:
        slots = [host.table.allocate(k) for k in keys]
        transferer.save(HFKVBuffer.from_cache(full_cache, spec), range(6), keys, TierName.HOST, slots).wait(10)
        buffer = HFKVBuffer.allocate(spec, 6 * 16)
        handle = transferer.load(keys, [TierName.HOST] * 6, slots, buffer, range(6), num_groups=2)
        with LayerWaitHooks(model, lambda layer: handle.wait_layer(layer, timeout=10)):
            got, _ = prefill(model, ids[6 * 16:], buffer.to_cache())
        handle.wait(10)
    finally:
        transferer.close()
        host.close()
    assert not handle.failed
    assert torch.equal(got, want)


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_message(tiny_llama, tiny_llama_spec):
    from transformers import DynamicCache, MistralConfig

    spec = tiny_llama_spec
    buffer = HFKVBuffer.allocate(spec, 2 * spec.block_tokens)
    good = torch.zeros((1, 2, *spec.block_shape[1:]))
    with pytest.raises(SpecMismatchError, match=r"src: is \(1, 3, 2, 2, 16, 16\)"):
        buffer.write_blocks([0], torch.zeros((1, 3, *spec.block_shape[1:])), (0, 2))
    with pytest.raises(SpecMismatchError, match="torch.float32"):
        buffer.write_blocks([0], good.double(), (0, 2))
    with pytest.raises(ConfigError, match=r"layers: expected a range within \[0, 4\), got \(3, 5\)"):
        buffer.write_blocks([0], good, (3, 5))
    with pytest.raises(ConfigError, match=r"blocks: \[2\] outside"):
        buffer.write_blocks([2], good, (0, 2))
    with pytest.raises(ConfigError, match="num_tokens: expected 0..32, got 33"):
        buffer.to_cache(num_tokens=33)
    with pytest.raises(ConfigError, match="num_tokens must be a positive int"):
        HFKVBuffer.allocate(spec, 0)
    with pytest.raises(SpecMismatchError, match=r"keys\[0\] is \(1, 2, 8\)"):
        HFKVBuffer(spec, [torch.zeros(1, 2, 8)] * 4, [torch.zeros(1, 2, 8)] * 4)
    with pytest.raises(ConfigError, match="expected 4 filled layers, got 0"):
        HFKVBuffer.from_cache(DynamicCache(), spec)
    with pytest.raises(ConfigError, match="kv_factor 2"):
        HFKVBuffer.allocate(spec.with_(kv_factor=1), 16)
    with pytest.raises(ConfigError, match="no decoder layer list"):
        LayerWaitHooks(torch.nn.Linear(2, 2), print)
    with pytest.raises(ConfigError, match="max_new_tokens: expected >= 1"):
        greedy_generate(tiny_llama, tokens(4), None, 0)
    with pytest.raises(ConfigError, match=r"input_ids: expected \[S\] or \[1, S\]"):
        prefill(tiny_llama, torch.zeros((1, 0), dtype=torch.long))
    sliding = MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=64, sliding_window=8)
    with pytest.raises(ConfigError, match="only full-attention layers"):
        buffer.to_cache(config=sliding)


def test_max_restorable_blocks_keeps_the_exact_suffix():
    assert max_restorable_blocks(2048 + 16, 64) == 32
    assert max_restorable_blocks(2048 + 15, 64) == 31  # recompute one more block rather than 15 tokens
    assert max_restorable_blocks(2048, 64, min_suffix_tokens=1) == 31  # the last token is always computed
    assert max_restorable_blocks(10, 64) == 0
    with pytest.raises(ConfigError, match="min_suffix_tokens >= 1"):
        max_restorable_blocks(100, 64, min_suffix_tokens=0)


def test_modules_import_without_transformers():
    code = ("import sys; import kvtier.scheduler, kvtier.scheduler.engines.hf.kv, kvtier.scheduler.engines.models, "
            "kvtier.scheduler.engines.hf.attention, kvtier.scheduler.cli.models; "
            "sys.exit('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
