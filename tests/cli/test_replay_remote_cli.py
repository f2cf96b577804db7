"""`kvtier replay` with a remote tier: simulation (`--remote CAPACITY`) and --real against a live Redis
Cluster started on loopback (`--remote-url`)."""

from __future__ import annotations

import json

from kvtier.scheduler.cli import main
from traceutil import mooncake_trace


def test_simulation_with_a_remote_tier(tmp_path):
    trace = mooncake_trace(tmp_path / "t.jsonl", 60)
    out = tmp_path / "r.json"
    # tiny memory and disk tiers, a large remote: the remote serves what they lost
    assert main(["replay", str(trace), "--gpu", "2b", "--host", "2b", "--disk", "2b", "--remote", "1000b",
                 "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["capacities"]["remote"]["blocks"] == 1000
    assert doc["hit_ratio_by_tier"]["blocks"]["remote"] > 0
    without = tmp_path / "n.json"
    assert main(["replay", str(trace), "--gpu", "2b", "--host", "2b", "--disk", "2b", "--quiet", "--json",
                 str(without), "--no-baselines"]) == 0
    assert doc["block_hit_ratio"] > json.loads(without.read_text())["block_hit_ratio"]


def test_real_mode_against_a_live_cluster(tmp_path, redis_cluster):
    trace = mooncake_trace(tmp_path / "t.jsonl", 25)
    out = tmp_path / "real.json"
    assert main(["replay", str(trace), "--real", "--quiet", "--host", "2b", "--disk", "0", "--gpu", "0",
                 "--remote", "1000b", "--remote-url", redis_cluster.url, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["corrupt_blocks"] == 0 and doc["restored_blocks"] > 0
    remote = doc["manager"]["remote"]
    assert remote["acknowledged_blocks"] > 0 and remote["hits"] > 0 and remote["corrupt"] == 0


def test_real_remote_needs_a_url(tmp_path, capsys):
    trace = mooncake_trace(tmp_path / "t.jsonl", 5)
    assert main(["replay", str(trace), "--real", "--quiet", "--remote", "100b"]) != 0
    assert "--remote with --real needs --remote-url" in capsys.readouterr().err
