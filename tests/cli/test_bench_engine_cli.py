"""`kvtier bench engine`: the harness end to end on the tiny random Llama (a smoke run: the figures of
a loaded 2-core machine and a 4-layer model mean nothing; the keys and the table's shape do)."""

from __future__ import annotations

import json

import pytest

from kvtier.scheduler.cli import main

pytest.importorskip("transformers")

KEYS = ("host_speedup", "disk_speedup", "disk_zstd_speedup", "host_efficiency", "disk_efficiency",
        "disk_zstd_efficiency", "disk_read_overhead", "miss_overhead", "host_hidden_fraction", "disk_hidden_fraction",
        "raw_cold_read_ms", "restored_mb", "rows", "miss", "planner", "machine", "restore_only_disk_vs_raw",
        "restore_only_disk_vs_raw_max", "spread", "load_avg")


def test_bench_engine_writes_every_key_and_the_whole_table(tmp_path, capsys):
    out = tmp_path / "engine.json"
    assert main(["bench", "engine", "--quick", "--model", "tiny-random", "--repeats", "1", "--prefix-tokens", "128",
                 "--threads", "1", "--dir", str(tmp_path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert all(key in data for key in KEYS), [k for k in KEYS if k not in data]
    paths = {(r["suffix"], r["path"]) for r in data["rows"]}
    assert paths == {(s, p) for s in (16, 64) for p in ("recompute", "ideal", "host", "disk", "disk_zstd")}
    assert data["repeats"] == 1 and data["threads"] == 1
    assert data["miss"]["saved_blocks"] > 0  # the miss path stored its prompts (after their first token)
    assert set(data["planner"]) == {"host", "disk"}
    # every headline figure with the spread of its repeats, and the load it was measured under
    for key in ("disk_read_overhead", "host_efficiency", "miss_overhead", "restore_only_disk_vs_raw"):
        spread = data["spread"][key]
        assert spread["min"] <= spread["median"] <= spread["max"], (key, spread)
    assert len(data["load_avg"]["end"]) == 3 and data["load_avg"]["cpus"] >= 1
    assert "host_efficiency" in capsys.readouterr().out
    assert not list(tmp_path.glob(".kvtier-bench-engine-*"))  # its stores are removed


def test_bench_engine_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match=r"--repeats >= 1 and --prefix-tokens >= 64 expected, got 0 and 2048"):
        main(["bench", "engine", "--model", "tiny-random", "--repeats", "0", "--dir", str(tmp_path)])
