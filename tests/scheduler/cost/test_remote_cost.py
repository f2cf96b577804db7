"""The remote tier in the cost model and the planner: a network profile (bandwidth, round trip) that the
planner weighs against recompute, and `measure_network` (what `kvtier calibrate --remote` runs) on a real
3-master Redis Cluster."""

from __future__ import annotations

import json

import pytest

from kvtier.scheduler.cost.network import measure_network, with_network
from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.cost.hardware import load_profile
from kvtier.scheduler.planner import Planner
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import TierName


def test_planner_restores_from_a_fast_network_and_recomputes_over_a_slow_one():
    profile = load_profile("h100-sxm")
    fast = CostModel.from_profile(profile.with_(remote_bytes_per_s=12.5e9, remote_rtt_s=100e-6), "llama-3-8b")
    slow = CostModel.from_profile(profile.with_(remote_bytes_per_s=0.125e9, remote_rtt_s=5e-3), "llama-3-8b")
    tiers = [TierName.REMOTE] * 120  # an 8k-token prefix only the remote holds
    plan_fast = Planner(fast).plan(tiers, 8000)
    plan_slow = Planner(slow).plan(tiers, 8000)
    # 100 Gb/s: most of the prefix comes over the network (the front may be recomputed meanwhile)
    assert plan_fast.num_restored_blocks > 60 and plan_fast.total_s < plan_fast.recompute_all_s
    # 1 Gb/s: restoring 1 GiB takes longer than the prefill; the planner recomputes
    assert plan_slow.num_restored_blocks < plan_fast.num_restored_blocks
    assert slow.restore_s("remote", 120) > slow.recompute_s(0, 7680)


def test_profiles_without_a_network_get_the_default_and_bad_values_are_named():
    profile = load_profile("h100-sxm")
    assert profile.remote_bytes_per_s == pytest.approx(100e9 / 8 * 0.8)
    data = profile.to_dict()
    data["remote_bytes_per_s"] = -1
    from kvtier.scheduler.cost.hardware import HardwareProfile

    with pytest.raises(ConfigError, match="remote_bytes_per_s must be > 0"):
        HardwareProfile.from_dict(data, source="x.json")


def test_measured_network_profile_is_saved_and_read_back(redis_cluster, tmp_path):
    model = CostModel.from_profile("cpu-this-machine", "smollm2-135m")
    net = measure_network(model.spec, redis_cluster.url, sizes=(1, 2, 4, 8), repeats=3)
    assert 0 < net.rtt_s < 1 and net.bytes_per_s > 1e6
    assert [role for _, _, role in net.points] == ["fit", "held_out", "fit", "fit"]
    calibrated = with_network(model, net)
    assert calibrated.profile.remote_bytes_per_s == net.bytes_per_s
    # the remote path follows the measured numbers; the file keeps them
    assert calibrated.path("remote").bytes_per_s == pytest.approx(net.bytes_per_s)
    calibrated.save(tmp_path / "p.json")
    again = CostModel.load(tmp_path / "p.json")
    assert again.profile.remote_rtt_s == pytest.approx(net.rtt_s)
    assert json.loads((tmp_path / "p.json").read_text())["remote_bytes_per_s"] == pytest.approx(net.bytes_per_s)
    assert json.loads(json.dumps(net.to_dict()))["remote_points"][0]["blocks"] == 1  # the report's form
