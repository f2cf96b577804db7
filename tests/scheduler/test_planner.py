"""Planner: optimal against brute force, the restore-vs-recompute cases, explain(), speed, bad input."""

from __future__ import annotations

import dataclasses
import pickle
import statistics
import time

import numpy as np
import pytest

from kvtier.scheduler.cost.model import CostModel

from kvtier.scheduler.cost.parts import PathCost, RecomputeCost
from kvtier.scheduler.cost.hardware import load_profile
from kvtier.scheduler.plan import Plan
from kvtier.scheduler import planner as planner_module
from kvtier.scheduler.planner import Planner
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import TierName

TIERS = ("gpu", "host", "disk")


def brute_force(cm: CostModel, tiers: list[str], num_tokens: int, disk_path: str = "disk") -> float:
    """min over every 0 <= s <= r <= k of max(compute [0, s), load [s, r)) + compute [r, n)."""
    bt = cm.spec.block_tokens
    k = min(len(tiers), (num_tokens - 1) // bt)
    best = float("inf")
    for r in range(k + 1):
        for s in range(r + 1):
            part = tiers[s:r]
            load = max(cm.restore_s("gpu", part.count("gpu")),
                       cm.restore_s("host", part.count("host") + part.count("disk")),
                       cm.restore_s(disk_path, part.count("disk")))
            best = min(best, max(cm.recompute_s(0, s * bt), load) + cm.recompute_s(r * bt, num_tokens - r * bt))
    return best


def plan_time(cm: CostModel, plan: Plan, disk_path: str = "disk") -> float:
    """The plan's time recomputed independently from its (s, r) and the cost model."""
    bt = plan.block_tokens
    tiers = [t.value for t in plan.tiers]
    assert tiers == [t.value for t, a, b in plan.tier_runs for _ in range(a, b)]
    part = tiers[plan.split:plan.restore_stop]
    load = max(cm.restore_s("gpu", part.count("gpu")),
               cm.restore_s("host", part.count("host") + part.count("disk")),
               cm.restore_s(disk_path, part.count("disk")))
    return max(cm.recompute_s(0, plan.split * bt), load) + \
        cm.recompute_s(plan.restore_stop * bt, plan.num_tokens - plan.restore_stop * bt)


def random_model(rng: np.random.Generator, block_tokens: int) -> CostModel:
    """A cost model with random (known) coefficients spanning restore-wins to recompute-wins."""
    base = CostModel.from_profile("h100-sxm", "llama-3-8b", block_tokens=block_tokens)

    def path() -> PathCost:
        return PathCost(latency_s=float(rng.choice([0.0, rng.uniform(0, 5e-3)])), bytes_per_s=1.0,
                        bytes_per_block=0, per_block_s=float(10 ** rng.uniform(-5, -2)))

    paths = {"gpu": path(), "host": path(), "disk": path(), "disk_zstd": path()}
    recompute = RecomputeCost(fixed_s=float(rng.uniform(0, 2e-3)), per_token_s=float(10 ** rng.uniform(-7, -4)),
                              per_token_ctx_s=float(10 ** rng.uniform(-11, -7)))
    return dataclasses.replace(base, paths=paths, recompute=recompute)


@pytest.mark.parametrize("seed", range(6))
def test_plan_equals_brute_force_minimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        bt = int(rng.choice([4, 16, 64]))
        cm = random_model(rng, bt)
        k = int(rng.integers(0, 11))
        tiers = [TIERS[i] for i in rng.integers(0, 3, size=k)]
        if rng.random() < 0.5:  # prefix-aware demotion: faster tiers in front
            tiers.sort(key=TIERS.index)
        num_tokens = k * bt + int(rng.integers(0, 3 * bt))
        if num_tokens == 0:
            num_tokens = 1
        codec = "zstd" if rng.random() < 0.3 else "none"
        disk_path = "disk_zstd" if codec == "zstd" else "disk"
        plan = Planner(cm, disk_codec=codec).plan(tiers, num_tokens)
        best = brute_force(cm, tiers, num_tokens, disk_path)
        assert plan.total_s == pytest.approx(best, rel=1e-9, abs=1e-15)
        assert plan.total_s == pytest.approx(plan_time(cm, plan, disk_path), rel=1e-9, abs=1e-15)
        assert plan.total_s == pytest.approx(max(plan.front_compute_s, plan.load_s) + plan.suffix_compute_s)
        assert 0 <= plan.split <= plan.restore_stop <= plan.num_matched_blocks
        assert plan.total_s <= plan.recompute_all_s * (1 + 1e-12)
        assert plan.total_s <= plan.restore_all_s * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_a_ramped_disk_path_is_costed_exactly_and_planned_near_the_minimum(seed: int) -> None:
    # a calibrated cold disk: small reads slower per byte than large ones (PathCost's ramp)
    rng = np.random.default_rng(100 + seed)
    worst = 1.0
    for _ in range(40):
        cm = random_model(rng, 16)
        disk = PathCost(latency_s=float(rng.uniform(0, 5e-3)), bytes_per_s=float(10 ** rng.uniform(8, 10)),
                        bytes_per_block=1_000_000, ramp_bytes=float(rng.uniform(4, 64)) * 1e6,
                        ramp_exponent=float(rng.uniform(0.5, 0.95)))
        cm = dataclasses.replace(cm, paths={**cm.paths, "disk": disk})
        k = int(rng.integers(1, 48))  # the pure-Python path and the numpy one
        tiers = sorted((TIERS[i] for i in rng.integers(0, 3, size=k)), key=TIERS.index)
        num_tokens = k * 16 + int(rng.integers(1, 48))
        plan = Planner(cm).plan(tiers, num_tokens)
        best = brute_force(cm, tiers, num_tokens)
        assert plan.total_s == pytest.approx(plan_time(cm, plan), rel=1e-9, abs=1e-15)  # the cost model's times
        assert best <= plan.total_s * (1 + 1e-12)
        assert plan.total_s <= min(plan.recompute_all_s, plan.restore_all_s) * (1 + 1e-12)
        worst = max(worst, plan.total_s / best)
    assert worst <= 1.05


def test_numpy_codes_and_tier_names_give_the_same_plan() -> None:
    planner = Planner(CostModel.from_profile("h100-sxm", "llama-3-8b"))
    names = ["gpu"] * 3 + ["host"] * 50 + ["disk"] * 40
    codes = np.array([0] * 3 + [1] * 50 + [2] * 40, dtype=np.int8)
    enums = [TierName(n) for n in names]
    assert planner.plan(names, 6000) == planner.plan(codes, 6000) == planner.plan(enums, 6000)


def test_the_pure_python_path_plans_exactly_as_numpy(monkeypatch) -> None:
    cm = CostModel.from_profile("h100-sxm", "llama-3-8b")
    rng = np.random.default_rng(3)
    cases = [(rng.integers(0, 3, k).astype(np.int8), int(k * cm.spec.block_tokens + rng.integers(1, 200)))
             for k in range(1, 2 * planner_module.SMALL_K + 2)]
    small = [Planner(cm).plan(codes, n) for codes, n in cases]
    monkeypatch.setattr(planner_module, "SMALL_K", 0)
    assert [Planner(cm).plan(codes, n) for codes, n in cases] == small


def test_a_repeated_question_is_answered_from_the_memo_and_only_the_same_question() -> None:
    planner = Planner(CostModel.from_profile("h100-sxm", "llama-3-8b"))
    codes = np.array([1] * 40 + [2] * 40, dtype=np.int8)
    first = planner.plan(codes, 6000)
    assert planner.plan(codes.copy(), 6000) is first
    assert planner.plan(["host"] * 40 + ["disk"] * 40, 6000) == first  # the same question in names
    assert planner.plan(codes, 7000) != first
    # the same bytes in another dtype or shape are other codes: planned (or refused) for what they are
    wide = np.array([1], dtype=np.int64)
    assert planner.plan(wide.view(np.int8), 1000).tier_codes == bytes([1] + [0] * 7)
    assert planner.plan(wide, 1000).tier_codes == bytes([1])
    with pytest.raises(ConfigError, match="1-D integer array"):
        planner.plan(wide.view(np.int8).reshape(2, 4), 1000)
    with pytest.raises(ConfigError, match="is not a tier"):
        planner.plan([["host"]], 1000)  # unhashable: still the named error
    planner.forget()
    assert planner.plan(codes, 6000) is not first and planner.plan(codes, 6000) == first


def test_all_from_host_restores_everything() -> None:
    # Llama-3-8B (GQA), 8k prefix in pinned RAM over PCIe Gen5: restore is ~12x cheaper than recompute
    cm = CostModel.from_profile("h100-sxm", "llama-3-8b")
    plan = Planner(cm).plan(["host"] * 128, 8192 + 100)
    assert plan.restore_stop == 128 and plan.num_restored_blocks >= 110
    assert plan.restored_by_tier[0][0] is TierName.HOST
    assert plan.total_s < plan.recompute_all_s / 5


def test_mha_on_slow_disk_recomputes() -> None:
    # Llama-2-7B (MHA, 512 KiB/token) with its KV on a 1 GB/s disk: restoring one block costs ~33 ms,
    # recomputing it ~2 ms, so almost everything is recomputed (only a few deep blocks load in parallel)
    slow = load_profile("h100-sxm").with_(disk_bytes_per_s=1e9)
    cm = CostModel.from_profile(slow, "llama-2-7b")
    plan = Planner(cm).plan(["disk"] * 128, 8192 + 100)
    assert plan.split >= 120
    assert plan.restore_all_s > 10 * plan.recompute_all_s
    assert plan.total_s > 0.9 * plan.recompute_all_s
    # with a latency longer than the whole recompute, nothing is restored at all
    glacial = CostModel.from_profile(slow.with_(disk_latency_s=1.0), "llama-2-7b")
    plan = Planner(glacial).plan(["disk"] * 128, 8192 + 100)
    assert (plan.split, plan.restore_stop, plan.num_restored_blocks) == (0, 0, 0)
    assert plan.total_s == plan.recompute_all_s
    assert "recompute all" in plan.explain()


def test_mha_host_front_disk_back_recomputes_the_disk_part() -> None:
    # prefix-aware demotion left the deep blocks on a slow disk: restore the host part, compute the rest
    slow = load_profile("h100-sxm").with_(disk_bytes_per_s=1e9)
    plan = Planner(CostModel.from_profile(slow, "llama-2-7b")).plan(["host"] * 64 + ["disk"] * 64, 8192 + 100)
    assert plan.restore_stop < 70 and plan.restore_stop - plan.split > 40
    assert plan.recomputed_blocks[1] == range(plan.restore_stop, 128)
    assert plan.tier_of(plan.restore_stop) is TierName.DISK
    assert "costs more than computing them" in plan.explain()


def test_gqa_on_nvme_overlaps_front_compute_with_the_load() -> None:
    # Llama-3-8B from one Gen4 NVMe: 165 ms to load vs 267 ms to recompute; computing the front while the
    # back loads beats both
    cm = CostModel.from_profile("h100-sxm", "llama-3-8b")
    plan = Planner(cm).plan(["disk"] * 128, 8192 + 100)
    assert 0 < plan.split < plan.restore_stop == 128
    assert plan.total_s < min(plan.restore_all_s, plan.recompute_all_s)


def test_explain_mentions_the_times() -> None:
    cm = CostModel.from_profile("h100-sxm", "llama-3-8b")
    plan = Planner(cm).plan(["host"] * 100 + ["disk"] * 28, 8192 + 100)
    text = plan.explain()
    for seconds in (plan.total_s, plan.recompute_all_s, plan.load_s, plan.suffix_compute_s):
        assert f"{seconds * 1e3:.1f} ms" in text or f"{seconds * 1e3:.2f} ms" in text
    assert "from host" in text and "from disk" in text


def test_nothing_cached_and_fully_cached_prompts() -> None:
    planner = Planner(CostModel.from_profile("h100-sxm", "llama-3-8b"))
    empty = planner.plan([], 1000)
    assert (empty.num_matched_blocks, empty.restore_stop, empty.total_s) == (0, 0, empty.recompute_all_s)
    assert "nothing is cached" in empty.explain()
    # every block of a 640-token prompt cached: the last block is computed for the last token's logits
    full = planner.plan(["host"] * 10, 640)
    assert (full.num_found_blocks, full.num_matched_blocks) == (10, 9)
    assert full.num_computed_tokens >= 64
    assert "logits" in full.explain()


def test_block_tokens_override_and_zstd_path() -> None:
    cm = CostModel.from_profile("h100-pcie5", "llama-3-8b", block_tokens=64)
    plan = Planner(cm).plan(["host"] * 20, 20 * 16 + 5, block_tokens=16)
    assert plan.block_tokens == 16 and plan.num_matched_blocks == 20
    zstd = Planner(cm, disk_codec="zstd").plan(["disk"] * 64, 64 * 64 + 5)
    plain = Planner(cm).plan(["disk"] * 64, 64 * 64 + 5)
    assert zstd.disk_path == "disk_zstd"
    assert zstd.restore_all_s > plain.restore_all_s  # Gen5 NVMe outruns 9 GB/s of zstd decode


def test_plan_is_frozen_and_slotted() -> None:
    plan = Planner(CostModel.from_profile("h100-sxm", "llama-3-8b")).plan(["host"] * 4, 300)
    assert not hasattr(plan, "__dict__")
    assert pickle.loads(pickle.dumps(plan)) == plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.split = 0  # type: ignore[misc]


def test_bad_input_is_named() -> None:
    planner = Planner(CostModel.from_profile("h100-sxm", "llama-3-8b"))
    with pytest.raises(ConfigError, match="'tape' is not a tier"):
        planner.plan(["host", "tape"], 1000)
    with pytest.raises(ConfigError, match="codes must be 0 \\(gpu\\), 1 \\(host\\), 2 \\(disk\\) or 3 \\(remote\\)"):
        planner.plan(np.array([1, 4]), 1000)
    with pytest.raises(ConfigError, match="1-D integer array"):
        planner.plan(np.array([1.0, 2.0]), 1000)
    with pytest.raises(ConfigError, match="3 matched blocks of 64 tokens exceed the prompt's num_tokens=100"):
        planner.plan(["host"] * 3, 100)
    with pytest.raises(ConfigError, match="num_tokens: expected a positive int, got 0"):
        planner.plan([], 0)
    with pytest.raises(ConfigError, match="block_tokens: expected a positive int"):
        planner.plan([], 10, block_tokens=0)
    with pytest.raises(ConfigError, match="codec: 'lz4' is not a codec"):
        Planner(planner.cost_model, disk_codec="lz4")
    with pytest.raises(ConfigError, match="block: 9 is not a matched block"):
        planner.plan(["host"] * 2, 1000).tier_of(9)


def test_plan_of_2048_blocks_is_fast() -> None:
    # 128k tokens at 64 tokens per block, host front and disk back; target: well under 1 ms
    planner = Planner(CostModel.from_profile("h100-sxm", "llama-3-8b"))
    codes = np.array([1] * 1024 + [2] * 1024, dtype=np.int8)
    planner.plan(codes, 131072 + 100)
    times = []
    for _ in range(30):
        planner.forget()  # time the planning, not the memo
        start = time.perf_counter()
        planner.plan(codes, 131072 + 100)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 2e-3  # typically ~0.25 ms here; slack for a busy shared machine


def test_layer_groups_grow_by_the_compute_after_a_load_over_the_load_within_their_bounds() -> None:
    cm = CostModel.from_profile("h100-sxm", "llama-3-8b", block_tokens=64)
    planner, bt, top = Planner(cm), cm.spec.block_tokens, planner_module.MAX_GROUP_GROWTH
    seen = set()
    for tiers in (["host"] * 8, ["host"] * 64, ["disk"] * 8, ["gpu", "host", "disk", "disk"] * 2):
        load = max(cm.restore_s("gpu", tiers.count("gpu")),
                   cm.restore_s("host", tiers.count("host") + tiers.count("disk")),
                   cm.restore_s("disk", tiers.count("disk")))
        for after in (1, 16, 64, 256, 1024, 4096, 16384, 65536):
            ratio = cm.recompute_s(8 * bt, after) / load
            groups, growth = planner.layer_groups(tiers, 8 * bt, 8 * bt + after, 4)
            if "disk" in tiers and ratio < planner_module.WHOLE_READ_BELOW:  # whole values, in file order
                assert (groups, growth) == (1, 1.0)
                seen.add("whole")
                continue
            assert groups == 4 and growth == pytest.approx(min(top, max(1 / top, ratio)))
            seen.add("low" if growth == 1 / top else "high" if growth == top else "between")
    assert seen == {"whole", "low", "between", "high"}  # every regime was exercised
    # nothing left to compute still costs a token (an engine recomputes the last one); nothing to load: grow most
    assert planner.layer_groups(["host"], bt, bt, 4) == planner.layer_groups(["host"], bt, bt + 1, 4)
    assert planner.layer_groups([], 0, 100, 4) == (4, top)
