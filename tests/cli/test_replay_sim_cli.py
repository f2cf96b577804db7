"""`kvtier replay` in simulation mode, --real mode and the no-trace demo: exit codes, outputs, errors."""

from __future__ import annotations

import argparse
import json

import pytest

from kvtier.scheduler.cli import main
from traceutil import mooncake_trace
from kvtier.scheduler.cli import simulate


def test_simulation_writes_json_and_table(tmp_path, capsys):
    trace = mooncake_trace(tmp_path / "t.jsonl")
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "TTFT" in table and "no cache" in table and "bounds" in table
    doc = json.loads(out.read_text())
    assert doc["mode"] == "simulation" and doc["requests"] == 30
    assert doc["block_hit_ratio"] > 0.5
    assert set(doc["ttft_ms"]) >= {"p50", "p90", "p99", "mean"}
    assert set(doc["bounds"]) >= {"infinite", "opt", "belady"}
    assert {"no_cache", "gpu_only", "offload_no_prefetch"} <= set(doc["baselines"])
    assert doc["model"] == "llama-3-8b" and doc["hardware"] == "h100-sxm" and doc["block_tokens"] == 512


def test_options_reach_the_run(tmp_path):
    trace = mooncake_trace(tmp_path / "t.jsonl")
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "--quiet", "--json", str(out), "--gpu", "3b", "--host", "0",
                 "--disk", "0", "--no-prefetch", "--time-scale", "2", "--hardware", "a100-pcie4",
                 "--model", "llama-2-7b", "--policy", "fifo"]) == 0
    doc = json.loads(out.read_text())
    assert doc["capacities"]["gpu"]["blocks"] == 3 and doc["capacities"]["host"]["blocks"] == 0
    assert doc["settings"]["prefetch"] is False and doc["settings"]["policy"] == "fifo"
    assert doc["time_scale"] == 2.0 and doc["time_scale_auto"] is False
    assert doc["hardware"] == "a100-pcie4" and doc["model"] == "llama-2-7b"


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    trace = mooncake_trace(tmp_path / "t.jsonl")
    png = tmp_path / "p.png"
    assert main(["replay", str(trace), "--quiet", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--time-scale", "fast"], "--time-scale"),
    (["--gpu", "10KiB"], "smaller than one block"),
    (["--policy", "lru,arc"], "one policy"),
    (["--hardware", "no-such-gpu"], "no-such-gpu"),
    (["--block-tokens", "100"], "does not divide"),
])
def test_bad_options_exit_2_with_a_message(tmp_path, capsys, argv, message):
    trace = mooncake_trace(tmp_path / "t.jsonl")
    assert main(["replay", str(trace), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_trace_line_exits_2_naming_the_line(tmp_path, capsys):
    trace = mooncake_trace(tmp_path / "t.jsonl", 3)
    trace.write_text(trace.read_text() + '{"timestamp": 1, "input_length": 5, "hash_ids": "x"}\n')
    assert main(["replay", str(trace), "--quiet"]) == 2
    assert "t.jsonl:4" in capsys.readouterr().err


def _args(**kw):
    base = dict(trace=None, format=None, skip_bad=False, json=None, quiet=True, seed=0, requests=120, gpu=None,
                host=None, disk=None, model="llama-3-8b", hardware="h100-sxm", prefetch=True, time_scale="auto",
                block_tokens=None, real=False, disk_path=None, plot=None, policy="lru", jobs=1, baselines=True)
    base.update(kw)
    return argparse.Namespace(**base)


def test_no_trace_runs_the_builtin_demo(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert simulate.run_simulation(_args(json=str(out), quiet=False)) == 0
    doc = json.loads(out.read_text())
    assert doc["trace"] == f"builtin:{simulate.DEMO_WORKLOAD}" and doc["requests"] == 120
    assert "kvtier replay (simulation)" in capsys.readouterr().out


def test_real_mode_moves_real_bytes(tmp_path):
    pytest.importorskip("torch")
    trace = mooncake_trace(tmp_path / "t.jsonl", 25)
    out = tmp_path / "real.json"
    disk = tmp_path / "store"
    assert main(["replay", str(trace), "--real", "--quiet", "--disk-path", str(disk), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["mode"] == "real" and doc["requests"] == 25
    assert doc["corrupt_blocks"] == 0 and doc["restored_blocks"] > 0 and doc["loads"] > 0
    assert doc["block_hit_ratio"] > 0.3
    assert doc["load_ms"]["measured"]["p50"] > 0 and doc["load_ms"]["predicted"]["p50"] > 0
    assert doc["bytes_per_block"] <= 256 * 1024
    assert any(disk.iterdir())  # the LMDB store is really there


def test_simulation_flags_through_the_cli(tmp_path):
    trace = mooncake_trace(tmp_path / "t.jsonl")
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "--quiet", "--max-batch", "4", "--gpu", "7b", "--no-baselines",
                 "--write-mode", "write-back", "--max-requests", "10", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["requests"] == 10 and doc["settings"]["max_batch"] == 4
    assert doc["capacities"]["gpu"]["blocks"] == 7 and doc["settings"]["write_mode"] == "write-back"
    assert doc["baselines"] == {} and doc["bounds"] == {}
