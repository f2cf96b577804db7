"""`kvtier replay --hit-only` and `kvtier gen-trace`: exit codes, messages, JSON schema, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvtier.scheduler.cli import main

TRACE = [
    {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
    {"timestamp": 10, "input_length": 1030, "output_length": 5, "hash_ids": [0, 1, 3]},
    {"timestamp": 20, "input_length": 600, "output_length": 5, "hash_ids": [0, 2]},
    {"timestamp": 30, "input_length": 1200, "output_length": 5, "hash_ids": [0, 1, 3]},
]


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    return path


def test_one_capacity_one_policy_json(trace, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "--hit-only", "--cache-blocks", "3", "--policy", "lru", "--quiet",
                 "--json", str(out)]) == 0
    assert capsys.readouterr().out == ""  # --quiet
    doc = json.loads(out.read_text())
    assert doc["block_hit_ratio"] == pytest.approx(4 / 11, abs=1e-6)  # hand-computed in test_hitonly
    assert doc["policy"] == "lru" and doc["cache_blocks"] == 3
    assert doc["bounds"]["infinite"] == pytest.approx(7 / 11, abs=1e-6)
    assert doc["block_hit_ratio"] <= doc["bounds"]["opt"] <= doc["bounds"]["infinite"]  # opt bounds every policy
    assert doc["results"][0]["block_hit_ratio"] == doc["block_hit_ratio"]


def test_sweep_json_and_table(trace, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["replay", str(trace), "--hit-only", "--cache-blocks", "2,3,8", "--policy", "lru,arc,s3fifo,suffix-arc",
                 "--weight", "tokens", "--warmup-fraction", "0.25", "--bounds", "opt,belady,min", "--jobs", "1",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "suffix-arc" in table and "opt (bound)" in table and "infinite (bound)" in table
    assert "belady (reference)" in table and "classic MIN (reference)" in table
    doc = json.loads(out.read_text())
    assert "block_hit_ratio" not in doc  # a sweep: results only
    assert doc["weight"] == "tokens" and doc["measured_requests"] == 3
    assert len(doc["results"]) == 12
    for r in doc["results"]:
        assert {"policy", "cache_blocks", "block_hit_ratio", "bounds"} <= set(r)
        assert {"infinite", "opt", "belady", "min"} <= set(r["bounds"])
        assert 0 <= r["block_hit_ratio"] <= r["bounds"]["opt"] + 1e-9 <= r["bounds"]["infinite"] + 2e-9


def test_builtin_workload_and_gen_trace_round_trip(tmp_path, capsys):
    assert main(["gen-trace", "chat", "--requests", "50", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 50 and all("hash_ids" in json.loads(ln) for ln in lines)
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out_file, out_builtin = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["replay", str(path), "--hit-only", "--cache-blocks", "500", "--quiet", "--json", str(out_file)]) == 0
    assert main(["replay", "chat", "--requests", "50", "--seed", "3", "--hit-only", "--cache-blocks", "500",
                 "--quiet", "--json", str(out_builtin)]) == 0
    a, b = json.loads(out_file.read_text()), json.loads(out_builtin.read_text())
    assert a["block_hit_ratio"] == b["block_hit_ratio"] > 0


@pytest.mark.parametrize("args, message", [
    (["--cache-blocks", "abc"], "--cache-blocks: 'abc'; expected comma-separated ints"),
    (["--cache-blocks", "0"], "--cache-blocks: 0; expected ints >= 1"),
    (["--policy", "lru,mru"], "policy: 'mru'; expected one of"),
    (["--warmup-fraction", "1.5"], "--warmup-fraction: 1.5"),
    (["--bounds", "arc"], "bounds: 'arc'; expected opt, belady, min or none"),
])
def test_bad_arguments_exit_2(trace, capsys, args, message):
    assert main(["replay", str(trace), "--hit-only", "--quiet", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_line_exit_2_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TRACE[0]) + "\n" + '{"timestamp": 1, "input_length": 9, "hash_ids": "x"}\n')
    assert main(["replay", str(path), "--hit-only", "--quiet"]) == 2
    assert "bad.jsonl:2: 'hash_ids' must be a list of ints, got str" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert main(["replay", str(path), "--hit-only", "--skip-bad", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"] == 1
    assert "skipped 1 malformed record" in capsys.readouterr().err


def test_missing_trace_exit_2(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "nope.jsonl"), "--hit-only"]) == 2
    assert "no such trace file" in capsys.readouterr().err


def test_hit_only_does_not_import_torch(trace):
    code = ("import sys; from kvtier.scheduler.cli import main; "
            f"rc = main(['replay', {str(trace)!r}, '--hit-only', '--quiet', '--cache-blocks', '2,3', '--jobs', '1']); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["0", "False"], out.stderr


def test_hints_reach_auto(tmp_path):
    plain, hinted = tmp_path / "p.json", tmp_path / "h.json"
    common = ["replay", "chat", "--requests", "400", "--hit-only", "--cache-blocks", "150", "--policy", "lru,auto",
              "--bounds", "none", "--quiet", "--jobs", "1"]
    assert main(common + ["--json", str(plain)]) == 0
    assert main(common + ["--hints", "--json", str(hinted)]) == 0
    p, h = (json.loads(f.read_text()) for f in (plain, hinted))
    ratio = lambda doc, name: next(r["block_hit_ratio"] for r in doc["results"] if r["policy"] == name)  # noqa: E731
    assert ratio(h, "lru") == ratio(p, "lru")  # hints are auto's alone
    assert ratio(h, "auto") > ratio(p, "auto")  # chat's ended sessions make room for the live ones
    assert h["hints"] is True and p["hints"] is False


def test_bench_policy_quick(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "policy", "--quick", "--requests", "150", "--jobs", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {"min_margin_vs_best_classic", "shared_trace_gain_2k", "gap_closed_2k", "hint_gain", "cells"} <= set(doc)
    for cell in doc["cells"]:
        best = max(cell[p] for p in ("lru", "arc", "s3fifo"))
        assert cell["margin"] == pytest.approx(cell["auto"] - best, abs=2e-4)
        assert cell["auto"] <= cell["opt"] + 1e-9  # opt bounds auto
    assert doc["min_margin_vs_best_classic"] == pytest.approx(min(c["margin"] for c in doc["cells"]), abs=2e-4)
