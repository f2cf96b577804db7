"""Simulation mode of `kvtier replay`: invariants of the discrete-event run on small traces.

The runs drive the real Decider / Planner / CostModel; only the clock and the links are simulated.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from kvtier.scheduler.replay import simreport, workloads
from kvtier.scheduler.replay.simulate import SimSettings, bounds, capacities, prepare, run_all, simulate
from kvtier.scheduler.replay.traces import Request
from kvtier.tiers.errors import ConfigError


def _requests(kind: str = "docqa", n: int = 200, seed: int = 1) -> list[Request]:
    return workloads.generate(kind, n, seed)


@pytest.fixture(scope="module")
def docqa():
    return _requests("docqa", 200)


def test_ttft_is_at_least_the_planned_prefill(docqa):
    settings = SimSettings()
    sim = simulate(prepare(docqa, settings), settings)
    for r in sim.records:
        # queueing and link contention only add to the planner's prediction
        assert r.start_s >= r.arrival_s
        assert r.ttft_s >= r.planned_s * (1 - 1e-9) - 1e-12
        assert r.finish_s >= r.first_token_s
        assert r.planned_s <= r.no_cache_s * (1 + 1e-9)


def test_bytes_are_conserved_between_decider_and_links(docqa):
    settings = SimSettings(gpu_blocks=40, host_blocks=400)
    workload = prepare(docqa, settings)
    sim = simulate(workload, settings)
    bpb = workload.cost_model.spec.bytes_per_block
    stats, by_reason = sim.decider_stats, sim.counters.bytes_by_reason
    # every block the decider counts as saved / demoted / written / promoted crossed a link exactly once
    assert by_reason.get("save", 0) == stats["saved_blocks"] * bpb
    assert by_reason.get("demote", 0) == stats["demoted_blocks"] * bpb
    assert by_reason.get("write-through", 0) == stats["written_to_disk_blocks"] * bpb
    assert by_reason.get("prefetch", 0) == stats["prefetched_blocks"] * bpb
    assert stats["demoted_blocks"] > 0 and stats["prefetched_blocks"] > 0  # the cascade and prefetch ran
    # the links carry exactly the bytes of the commands (none lost, none counted twice)
    assert sum(sim.counters.bytes_by_link.values()) == sum(by_reason.values())
    # what reached the disk was written there: write-throughs plus demotions into it
    assert sim.counters.bytes_by_link["disk-write"] >= stats["written_to_disk_blocks"] * bpb


def test_a_bigger_lru_cache_never_has_a_lower_hit_ratio(docqa):
    settings = SimSettings(policy="lru", host_blocks=0, disk_blocks=0, prefetch=False)
    workload = prepare(docqa, settings)
    ratios = []
    for blocks in (20, 80, 300, 1200, 5000):
        sim = simulate(workload, replace(settings, gpu_blocks=blocks))
        ratios.append(simreport.summarize(sim, workload)["block_hit_ratio"])
    assert ratios == sorted(ratios), ratios
    assert ratios[-1] > ratios[0]


def test_prefetch_on_a_disk_resident_workload_promotes_to_host_only_what_is_used():
    # small memory tiers (gpu 2%, host 5% of the unique blocks), every block on disk, a busy engine
    # (no-cache load 0.9) so requests wait: prefetch promotes queued requests' blocks disk -> host
    reqs = _requests("docqa", 300, seed=3)
    workload = prepare(reqs, SimSettings())
    u = workload.unique_blocks
    # LRU: the policy stays out of what is compared (`kvtier bench prefetch` measures the default's)
    settings = SimSettings(gpu_blocks=round(0.02 * u), host_blocks=round(0.05 * u), disk_blocks=u,
                           time_scale=workload.auto_time_scale(0.9), policy="lru")
    on_sim = simulate(workload, settings)
    off_sim = simulate(workload, replace(settings, prefetch=False))
    on, off = (simreport.summarize(s, workload) for s in (on_sim, off_sim))
    st = on_sim.decider_stats
    assert st["prefetched_blocks"] > 0 and off_sim.decider_stats["prefetched_blocks"] == 0
    # a load never reads from disk a block a promotion is bringing up: it joins that move
    assert on_sim.counters.double_reads == 0 and st["double_reads"] == 0
    # promotions are read by their requests before they leave host
    assert st["prefetch_used_blocks"] >= 0.8 * st["prefetched_blocks"]
    # promotions run on the disk-read link only (disk -> host), never into the gpu tier
    prefetch_bytes = on_sim.counters.bytes_by_reason["prefetch"]
    assert prefetch_bytes == st["prefetched_blocks"] * workload.cost_model.spec.bytes_per_block
    assert on_sim.counters.bytes_by_link["disk-read"] >= prefetch_bytes
    # loads read fewer blocks from disk, and no request is slower at the tail
    assert on["hit_ratio_by_tier"]["blocks"]["disk"] < off["hit_ratio_by_tier"]["blocks"]["disk"]
    assert on["ttft_ms"]["p99"] <= off["ttft_ms"]["p99"] * 1.02
    assert on["block_hit_ratio"] == pytest.approx(off["block_hit_ratio"], abs=0.02)


def test_no_cache_baseline_computes_everything(docqa):
    settings = SimSettings(cache=False)
    workload = prepare(docqa, settings)
    summary = simreport.summarize(simulate(workload, settings), workload)
    assert summary["block_hit_ratio"] == 0.0
    assert sum(summary["bytes_moved"].values()) == 0
    assert summary["decisions"]["none-cached"] == len(docqa)


def test_auto_time_scale_sets_the_no_cache_load(docqa):
    workload = prepare(docqa, SimSettings())
    scale = workload.auto_time_scale(0.7)
    assert workload.no_cache_load / scale == pytest.approx(0.7)
    sim = simulate(workload, SimSettings())
    assert sim.time_scale == pytest.approx(scale)


def test_default_capacities_are_fractions_of_the_unique_blocks(docqa):
    workload = prepare(docqa, SimSettings())
    caps = capacities(workload, SimSettings())
    u = workload.unique_blocks
    assert caps == {"gpu": round(0.05 * u), "host": round(0.30 * u), "disk": u}
    with pytest.raises(ConfigError, match="at least one memory tier"):
        capacities(workload, SimSettings(gpu_blocks=0, host_blocks=0))


def test_block_tokens_splits_trace_blocks():
    # a 512-token trace block split into 64-token kvtier blocks; the partial last block keeps its tokens
    reqs = [Request(0, 0.0, 1000, 10, (7, 8)), Request(1, 1.0, 600, 10, (7, 9))]
    workload = prepare(reqs, SimSettings(block_tokens=64))
    first, second = workload.requests
    assert len(first.keys) == 8 + 8 and sum(first.weights) == 1000
    assert first.keys[:8] == second.keys[:8]  # the shared trace block -> the same 8 keys
    assert len(set(first.keys)) == 16
    assert workload.cost_model.spec.block_tokens == 64
    with pytest.raises(ConfigError, match="does not divide"):
        prepare(reqs, SimSettings(block_tokens=100))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="--max-batch"):
        SimSettings(max_batch=0)
    with pytest.raises(ConfigError, match="--time-scale"):
        SimSettings(time_scale=-1.0)
    with pytest.raises(ConfigError, match="gpu_blocks"):
        SimSettings(gpu_blocks=-5)


def test_json_document_has_every_figure(docqa):
    settings = SimSettings()
    workload = prepare(docqa, settings)
    main, baselines, found = run_all(workload, settings, jobs=1)
    doc = simreport.simulation_json(main, workload, baselines, found, {"trace": "t", "format": "kvtier"}, 1.0)
    text = json.dumps(doc, allow_nan=False)  # strict JSON: no NaN anywhere
    back = json.loads(text)
    assert 0.0 < back["block_hit_ratio"] <= back["bounds"]["infinite"] + 1e-9
    assert set(back["ttft_ms"]) >= {"p50", "p90", "p99", "mean"}
    assert set(back["bounds"]) >= {"infinite", "opt", "belady"}
    assert set(back["baselines"]) == {"no_cache", "gpu_only", "offload_no_prefetch"}
    for b in back["baselines"].values():
        assert {"block_hit_ratio", "ttft_ms"} <= set(b)
    assert back["baselines"]["no_cache"]["block_hit_ratio"] == 0.0
    assert back["baselines"]["gpu_only"]["block_hit_ratio"] <= back["block_hit_ratio"] + 1e-9
    assert set(back["hit_ratio_by_tier"]) == {"blocks", "tokens"}
    assert back["settings"]["policy"] == "auto" and back["time_scale_auto"] is True
    assert "kvtier" in simreport.simulation_table(back)


def test_bounds_use_the_hit_only_code(docqa):
    workload = prepare(docqa, SimSettings())
    found = bounds(workload, {"gpu": 30, "host": 0, "disk": 0})
    assert found["belady"] <= found["opt"] <= found["infinite"]
    assert found["belady_gpu"] == found["belady"] and found["opt_gpu"] == found["opt"]


def test_simulation_path_does_not_import_torch(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i * 100, "input_length": 1200, "output_length": 5,
                                         "hash_ids": [0, 1, 2 + i]}) + "\n" for i in range(20)))
    code = ("import sys; from kvtier.scheduler.cli import main; "
            f"rc = main(['replay', {str(trace)!r}, '--quiet']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
