"""The transformers serving loop with kvtier: exact restores across tiers and splits, misses, foreign KV,
failed blocks, layer-wise overlap.

Exactness: bitwise in float32 (tiny random Llama, eager attention, CPU) unless a split recomputes the
front in a pass of its own (then within `SPLIT_LOGIT_ATOL`, same tokens); bfloat16 within
`BF16_LOGIT_ATOL` of recomputing (observed: equal).
"""

from __future__ import annotations

import dataclasses
import struct
import threading

import pytest
import torch

pytest.importorskip("transformers")

from kvtier.scheduler.config import OffloadConfig  # noqa: E402
from kvtier.scheduler.engines.hf.adapter import HFEngine  # noqa: E402
from kvtier.scheduler.engines.hf.kv import spec_for_model  # noqa: E402
from kvtier.scheduler.engines.hf.generate import greedy_generate, prefill  # noqa: E402
from kvtier.scheduler.engines.models import build_random_llama  # noqa: E402
from kvtier.scheduler.manager import OffloadManager  # noqa: E402
from kvtier.tiers.errors import ConfigError, SpecMismatchError  # noqa: E402

pytestmark = pytest.mark.transformers

T = 16
#: bf16 logits may differ from recomputing by at most this (observed on this machine: 0.0, bitwise equal;
#: the bound leaves room for other CPUs' bf16 kernels; logits have magnitude ~0.5)
BF16_LOGIT_ATOL = 0.02


#: with a separate front pass (0 < s < r) the front's KV comes from a shorter forward pass, whose GEMMs MKL
#: blocks (and so rounds) differently from the whole-prompt pass: measured here at most 1e-7 on the tiny
#: Llama (logits ~0.5) and 2.3e-5 on SmolLM2-135M (a 333-token prompt, s = 3, r = 4); greedy tokens equal
SPLIT_LOGIT_ATOL = 1e-5


def assert_restored_logits(logits: torch.Tensor, recomputed: torch.Tensor, *, front_pass: bool) -> None:
    """Bitwise equal to recomputing, or within `SPLIT_LOGIT_ATOL` when the front had its own pass."""
    if front_pass:
        assert float((logits - recomputed).abs().max()) <= SPLIT_LOGIT_ATOL
    else:
        assert torch.equal(logits, recomputed)


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def manager_for(model, spec, **config) -> OffloadManager:
    config.setdefault("host_bytes", 64 * spec.bytes_per_block)
    return OffloadManager(spec, OffloadConfig(prefetch=False, **config), model_config=model.config.to_dict())


def disk_only(model, spec, tmp_path, codec="none", stored_by=None, **config) -> OffloadManager:
    """A manager whose blocks sit on disk only: stored by a first manager (write-through), which is closed;
    a second one on the same store rebuilds its index from the disk (its host pool is empty)."""
    disk = dict(disk_bytes=64 * spec.bytes_per_block, disk_path=str(tmp_path / "kv"), codec=codec)
    if stored_by is not None:
        with manager_for(model, spec, **disk) as first:
            stored_by(HFEngine(model, first))
    return manager_for(model, spec, **disk, **config)


def store_prompt(prompt):
    def run(engine: HFEngine) -> None:
        engine.prefill(prompt)
        engine.manager.flush()
    return run


def force(split: int, restore_stop: int):
    return lambda plan: dataclasses.replace(plan, split=split, restore_stop=restore_stop)


@pytest.fixture(scope="module")
def prompts():
    first = tokens(6 * T + 5)
    second = torch.cat([first, tokens(2 * T + 3, seed=9)])  # shares the first's 6 full blocks
    return first, second


@pytest.fixture(scope="module")
def expected(tiny_llama, prompts):
    """Recomputing the whole second prompt: its logits and 6 greedy tokens."""
    logits, _ = prefill(tiny_llama, prompts[1])
    return logits, greedy_generate(tiny_llama, prompts[1], None, 6)


# -- exactness across tiers and splits ------------------------------------------------------------


@pytest.mark.parametrize("tier", ["gpu", "host", "disk", "disk-zstd"],
                         ids=["gpu-pool", "host", "disk", "disk-zstd"])  # (a bare "gpu" id would mean "needs CUDA")
def test_restore_from_every_tier_is_bitwise_equal_to_recomputing(tiny_llama, tiny_llama_spec, prompts, expected,
                                                                tier, tmp_path):
    model, spec = tiny_llama, tiny_llama_spec
    first, second = prompts
    if tier.startswith("disk"):
        manager = disk_only(model, spec, tmp_path, "zstd" if tier == "disk-zstd" else "none", store_prompt(first))
    else:
        sizes = dict(gpu_bytes=64 * spec.bytes_per_block, host_bytes=0) if tier == "gpu" else {}
        manager = manager_for(model, spec, **sizes)
        store_prompt(first)(HFEngine(model, manager))
    with manager:
        plan = manager.plan("probe", second)
        assert plan.num_matched_blocks == 6 and set(plan.tiers) == {tier.split("-")[0]}
        manager.cancel("probe")
        # the whole prefix restored (the default cost model may prefer recomputing a tiny model's KV over a disk read)
        out = HFEngine(model, manager).generate(second, 6, plan_fn=force(0, 6))
        assert out.prefill.restored_tokens == 6 * T and out.prefill.failed_blocks == 0
        assert torch.equal(out.prefill.logits, expected[0])
        assert torch.equal(out.tokens, expected[1])
        assert manager.stats()["hit_blocks_by_tier"] == {tier.split("-")[0]: 6}


def test_a_disk_restore_leaves_exact_host_copies_for_the_next_restore(tiny_llama, tiny_llama_spec, prompts,
                                                                      expected, tmp_path):
    """Disk blocks are read into the host tier's slots and copied into the model's cache; the next prefill
    (same engine, same buffer) restores them from host, bitwise equal."""
    model, spec = tiny_llama, tiny_llama_spec
    first, second = prompts
    with disk_only(model, spec, tmp_path, stored_by=store_prompt(first)) as manager:
        engine = HFEngine(model, manager, store=False)
        for tier in ("disk", "host"):
            before = manager.stats()["hit_blocks_by_tier"].get(tier, 0)
            out = engine.prefill(second, plan_fn=force(0, 6))
            assert out.restored_tokens == 6 * T and torch.equal(out.logits, expected[0])
            assert manager.stats()["hit_blocks_by_tier"].get(tier, 0) == before + 6


@pytest.mark.parametrize("split,restore_stop", [(0, 6), (2, 6), (5, 6), (0, 3), (2, 4), (3, 3), (6, 6)])
def test_every_split_gives_the_recomputed_tokens(tiny_llama, tiny_llama_spec, prompts, expected,
                                                 split, restore_stop):
    """Front [0, s) recomputed while [s, r) loads, then [r*T, n) computed: the same greedy tokens; logits
    bitwise equal without a separate front pass (s = 0 or r = s), within `SPLIT_LOGIT_ATOL` with one."""
    model, spec = tiny_llama, tiny_llama_spec
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        store_prompt(prompts[0])(engine)
        out = engine.generate(prompts[1], 6, plan_fn=force(split, restore_stop))
        assert out.prefill.front_tokens == (split * T if restore_stop > split else 0)  # r == s: one plain pass
        assert out.prefill.restored_tokens == (restore_stop - split) * T
        assert_restored_logits(out.prefill.logits, expected[0], front_pass=0 < split < restore_stop)
        assert torch.equal(out.tokens, expected[1])


@pytest.mark.parametrize("num_tokens", [7 * T + 3, 9 * T + 13, 12 * T + 1])
def test_splits_at_several_prompt_lengths(tiny_llama, tiny_llama_spec, num_tokens):
    """Splits at the front, middle and back of prompts of three lengths, against one recompute each."""
    model, spec = tiny_llama, tiny_llama_spec
    prompt = tokens(num_tokens, seed=num_tokens)
    reference = prefill(model, prompt)[0]
    k = (num_tokens - 16) // T  # the suffix keeps at least 16 computed tokens
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        store_prompt(prompt)(engine)
        for s, r in [(0, k), (1, 2), (k // 2, k), (k - 1, k), (2, k // 2 + 1)]:
            logits = engine.prefill(prompt, plan_fn=force(s, r)).logits
            assert_restored_logits(logits, reference, front_pass=0 < s < r)


def test_planner_plan_restores_and_a_plan_out_of_range_is_refused(tiny_llama, tiny_llama_spec, prompts):
    model, spec = tiny_llama, tiny_llama_spec
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        store_prompt(prompts[0])(engine)
        result = engine.prefill(prompts[1])
        assert result.plan.restore_stop > result.plan.split  # the default cost model restores here
        with pytest.raises(ConfigError, match=r"plan_fn: split 3, restore_stop 9 outside"):
            engine.prefill(prompts[1], plan_fn=force(3, 9))


def test_restore_keeps_an_exact_suffix_of_at_least_16_tokens(tiny_llama, tiny_llama_spec):
    """A prompt ending 5 tokens after a stored block boundary recomputes the last stored block too."""
    model, spec = tiny_llama, tiny_llama_spec
    stored = tokens(4 * T)
    prompt = torch.cat([stored, tokens(5, seed=4)])
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        store_prompt(stored)(engine)
        result = engine.prefill(prompt)
        assert result.restored_tokens == 3 * T and result.computed_tokens == T + 5
        assert torch.equal(result.logits, prefill(model, prompt)[0])


def test_prompt_shorter_than_one_block_is_computed_and_stores_nothing(tiny_llama, tiny_llama_spec):
    model, spec = tiny_llama, tiny_llama_spec
    prompt = tokens(T - 3)
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        for _ in range(2):
            result = engine.prefill(prompt)
            manager.flush()
            assert result.restored_tokens == 0 and result.computed_tokens == T - 3
            assert torch.equal(result.logits, prefill(model, prompt)[0])
        assert manager.stats()["saved_blocks"] == 0


def test_prompt_diverging_mid_block_restores_only_the_blocks_before(tiny_llama, tiny_llama_spec):
    model, spec = tiny_llama, tiny_llama_spec
    first = tokens(6 * T)
    second = torch.cat([first[:2 * T + T // 2], tokens(3 * T, seed=3)])
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        store_prompt(first)(engine)
        out = engine.generate(second, 4)
        assert out.prefill.restored_tokens == 2 * T
        assert torch.equal(out.prefill.logits, prefill(model, second)[0])
        assert torch.equal(out.tokens, greedy_generate(model, second, None, 4))


# -- foreign KV is never served -------------------------------------------------------------------


@pytest.mark.parametrize("other", ["other-weights", "other-config"])
def test_blocks_of_another_model_are_never_served(tiny_llama, tiny_llama_spec, prompts, tmp_path, other):
    """One disk store, two models: the second finds nothing of the first's and recomputes."""
    if other == "other-weights":  # same geometry and config, other weights
        model_b = build_random_llama(seed=1)
        spec_b = spec_for_model(model_b, "random-1", T)
        assert spec_b.fields() | {"weights_revision": "x"} == tiny_llama_spec.fields() | {"weights_revision": "x"}
    else:
        model_b = build_random_llama(seed=0, num_layers=2)
        spec_b = spec_for_model(model_b, "random-0", T)
    disk_only(tiny_llama, tiny_llama_spec, tmp_path, stored_by=store_prompt(prompts[0])).close()
    with disk_only(model_b, spec_b, tmp_path) as manager:
        assert manager.lookup(prompts[1]) == 0
        result = HFEngine(model_b, manager).prefill(prompts[1])
        assert result.restored_tokens == 0 and result.computed_tokens == len(prompts[1])
        assert torch.equal(result.logits, prefill(model_b, prompts[1])[0])


def test_forged_disk_value_naming_another_fingerprint_is_a_miss_and_recomputed(tiny_llama, tiny_llama_spec,
                                                                               prompts, tmp_path):
    """Model A's valid values planted under model B's keys (B: same geometry, other weights): B's index
    lists them, the plan restores them, the read's header check refuses them, the engine recomputes."""
    import lmdb

    from kvtier.tiers.disk import env as diskenv
    from kvtier.tiers.keys import KeyChain

    spec_a = tiny_llama_spec
    model_b = build_random_llama(seed=1)
    spec_b = spec_for_model(model_b, "random-1", T)
    disk_only(tiny_llama, spec_a, tmp_path, stored_by=store_prompt(prompts[0])).close()
    keys_a = KeyChain.for_spec(spec_a).keys(prompts[0])
    keys_b = KeyChain.for_spec(spec_b).keys(prompts[0])
    env = lmdb.open(str(tmp_path / "kv"), max_dbs=4, map_size=1 << 30)
    blocks, index = env.open_db(diskenv.BLOCKS_DB), env.open_db(diskenv.INDEX_DB)
    with env.begin(write=True) as txn:
        for ka, kb in zip(keys_a, keys_b):
            value = txn.get(spec_a.fingerprint_bytes + bytes(ka), db=blocks)
            txn.put(spec_b.fingerprint_bytes + bytes(kb), value, db=blocks)
            txn.put(spec_b.fingerprint_bytes + bytes(kb), struct.pack("<Q", len(value)), db=index)
    env.close()
    with disk_only(model_b, spec_b, tmp_path) as manager:
        assert manager.lookup(prompts[1]) == 6 * T  # the forged values are listed
        result = HFEngine(model_b, manager).prefill(prompts[1], plan_fn=force(0, 6))
        assert result.failed_blocks == 6 and result.restored_tokens == 0
        assert torch.equal(result.logits, prefill(model_b, prompts[1])[0])
        assert manager.stats()["disk"]["foreign"] == 6


def test_engine_refuses_a_spec_of_another_model(tiny_llama, tiny_llama_spec):
    other = build_random_llama(seed=0, num_layers=2)
    with manager_for(tiny_llama, tiny_llama_spec) as manager:
        with pytest.raises(SpecMismatchError, match=r"spec: .* does not describe this model's KV"):
            HFEngine(other, manager)
        with pytest.raises(ConfigError, match=r"token_ids: expected at least one token"):
            HFEngine(tiny_llama, manager).prefill([])
        with pytest.raises(ConfigError, match=r"max_new_tokens: expected >= 1, got 0"):
            HFEngine(tiny_llama, manager).generate([1, 2], 0)


# -- bf16, overlap, the plain baseline ------------------------------------------------------------


def test_bfloat16_restore_is_within_the_stated_tolerance(prompts):
    model = build_random_llama(seed=0, dtype=torch.bfloat16)
    spec = spec_for_model(model, "random-0", T)
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        store_prompt(prompts[0])(engine)
        result = engine.prefill(prompts[1], plan_fn=force(2, 6))
        assert result.restored_tokens == 4 * T
        want, _ = prefill(model, prompts[1])
        torch.testing.assert_close(result.logits.float(), want.float(), atol=BF16_LOGIT_ATOL, rtol=0)


def test_layer_i_runs_once_layer_i_is_restored_while_later_layers_still_load(tiny_llama, tiny_llama_spec, prompts,
                                                                           monkeypatch):
    """The suffix pass's layer i waits on layer i's group only: with one group per layer and the copies
    of layers 2 and 3 held back until decoder layer 1 has started, the pass still runs (a pass that
    waited for the whole load first would find layer 3 ready at layer 1)."""
    from kvtier.scheduler.engines.hf import adapter as hf
    from kvtier.scheduler.engines.hf.kv import HFKVBuffer, LayerWaitHooks

    model, spec = tiny_llama, tiny_llama_spec
    release = threading.Event()

    class GatedBuffer(HFKVBuffer):
        def write_blocks(self, dst_blocks, src, layers):
            if layers[0] >= 2:
                release.wait(10)
            super().write_blocks(dst_blocks, src, layers)

    with manager_for(model, spec, num_layer_groups=spec.num_layers) as manager:
        engine = HFEngine(model, manager)
        store_prompt(prompts[0])(engine)
        loads = []
        real_load = manager.load
        manager.load = lambda *a, **k: loads.append(real_load(*a, **k)) or loads[-1]
        monkeypatch.setattr(hf, "HFKVBuffer", GatedBuffer)
        seen: list[tuple[int, bool]] = []

        def probe(i: int) -> None:
            seen.append((i, loads[-1].handle.layer_ready(spec.num_layers - 1)))
            if i == 1:
                release.set()

        with LayerWaitHooks(model, probe):  # registered first: runs before the engine's own wait
            result = engine.prefill(prompts[1], plan_fn=force(0, 6))
        assert seen[:2] == [(0, False), (1, False)] and [i for i, _ in seen] == [0, 1, 2, 3]
        assert result.restored_tokens == 6 * T
        assert torch.equal(result.logits, prefill(model, prompts[1])[0])


def test_without_a_manager_it_is_the_plain_model(tiny_llama, prompts, expected):
    out = HFEngine(tiny_llama).generate(prompts[1], 6)
    assert out.prefill.restored_tokens == 0 and out.ttft_s > 0
    assert torch.equal(out.tokens, expected[1])


def test_engine_module_imports_without_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"
            "import kvtier.scheduler.engines.hf.adapter, kvtier.scheduler.bench.engine\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_chat_turn_restores_the_previous_prompt_and_reply(tiny_llama, tiny_llama_spec):
    """`store_output`: turn 2 (turn 1's prompt + reply + a new message) restores the reply's blocks too."""
    model, spec = tiny_llama, tiny_llama_spec
    turn1 = tokens(3 * T + 7)
    with manager_for(model, spec) as manager:
        engine = HFEngine(model, manager)
        reply = engine.generate(turn1, 2 * T, store_output=True).tokens
        manager.flush()
        turn2 = torch.cat([turn1, reply, tokens(T + 4, seed=5)])
        out = engine.generate(turn2, 4, plan_fn=force(0, 5))
        assert out.prefill.restored_tokens == 5 * T  # beyond turn 1's 3 prompt blocks
        assert torch.equal(out.tokens, greedy_generate(model, turn2, None, 4))


def test_a_late_load_is_given_up_and_the_prompt_recomputed(tiny_llama, tiny_llama_spec, prompts, expected,
                                                           monkeypatch):
    """A load that misses `load_timeout_s` is abandoned (its buffer is not reused) and the blocks recomputed."""
    from kvtier.scheduler.engines.hf import adapter as hf
    from kvtier.scheduler.engines.hf.kv import HFKVBuffer

    model, spec = tiny_llama, tiny_llama_spec
    release = threading.Event()

    class StuckBuffer(HFKVBuffer):
        def write_blocks(self, dst_blocks, src, layers):
            release.wait(10)
            super().write_blocks(dst_blocks, src, layers)

    with manager_for(model, spec, load_timeout_s=0.2) as manager:
        engine = HFEngine(model, manager)
        store_prompt(prompts[0])(engine)
        monkeypatch.setattr(hf, "HFKVBuffer", StuckBuffer)
        try:
            result = engine.prefill(prompts[1], plan_fn=force(1, 6))
        finally:
            release.set()
        assert result.failed_blocks == 5 and result.restored_tokens == 0 and result.front_tokens == T
        assert torch.equal(result.logits, expected[0])
        assert engine._scratch is None
