"""`kvtier bench all` (`make bench`): the suite's summary, its busy loop, and the shared spread/load helpers."""

from __future__ import annotations

import json
import time

import pytest

from kvtier.scheduler.bench import common
from kvtier.scheduler.bench.suite import BusyLoop, Outcome, summarise
from kvtier.scheduler.cli import main


def test_bench_all_runs_a_benchmark_in_its_own_process_and_summarises_it(tmp_path, capsys):
    out = tmp_path / "summary.json"
    code = main(["bench", "all", "--only", "scheduler", "--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["busy_loop"] is True and data["runs"] == 1 and data["benches"] == ["scheduler"]
    (check,) = data["checks"]
    assert check["figure"] == "lookup_plan_ms" and check["op"] == "<=" and check["target"] == 2
    assert check["runs"] == [data["results"]["scheduler"][0]["lookup_plan_ms"]]
    assert code == (0 if check["ok"] else 1)  # the exit status says whether every target was met
    run = data["per_run"]["scheduler"][0]
    assert run["error"] == "" and len(run["load_avg_start"]) == 3 and run["wall_s"] > 0
    # the benchmark's own JSON carries its spread and load average
    inner = data["results"]["scheduler"][0]
    assert inner["spread"]["lookup_plan_ms"]["min"] <= inner["spread"]["lookup_plan_ms"]["median"]
    assert "start" in inner["load_avg"]
    assert "lookup_plan_ms" in capsys.readouterr().out


def test_unknown_benchmark_is_named(capsys):
    assert main(["bench", "all", "--only", "tiers,nope"]) == 2
    assert "--only: 'tiers,nope'; expected a comma-separated list of tiers" in capsys.readouterr().err
    assert main(["bench", "all", "--runs", "0"]) == 2
    assert "--runs: expected a positive int, got 0" in capsys.readouterr().err


def test_summary_takes_the_median_of_runs_and_fails_a_missing_run():
    def outcome(figures):
        return Outcome(figures, 1.0, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), "" if figures else "exited 1")

    # three runs: the median (1.5) meets the target though one run (2.5) does not
    checks = summarise(["scheduler"], {"scheduler": [outcome({"lookup_plan_ms": v}) for v in (1.0, 2.5, 1.5)]})
    assert checks[0]["median"] == 1.5 and (checks[0]["min"], checks[0]["max"]) == (1.0, 2.5) and checks[0]["ok"]
    # a run that failed leaves the figure unmet, whatever the others say
    checks = summarise(["scheduler"], {"scheduler": [outcome({"lookup_plan_ms": 1.0}), outcome(None)]})
    assert checks[0]["runs"] == [1.0, None] and not checks[0]["ok"]


def test_busy_loop_spins_until_closed_and_stops_itself_at_its_deadline():
    with BusyLoop(max_s=60) as busy:
        assert busy.proc.poll() is None  # running
    assert busy.proc.returncode is not None  # closed and reaped
    short = BusyLoop(max_s=0.2)
    assert short.proc.wait(timeout=30) == 0  # its own deadline ended it
    short.close()


def test_spread_and_load_helpers(tmp_path):
    assert common.spread_of([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    with pytest.raises(ValueError, match="no values"):
        common.spread_of([])
    common.begin_run()
    common.write_json(tmp_path / "x.json", {"figure": 1})
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["figure"] == 1 and len(data["load_avg"]["start"]) == 3 and len(data["load_avg"]["end"]) == 3


def test_interleave_settles_before_each_timed_call_outside_the_timer():
    order: list[str] = []
    fns = {"limit": lambda: order.append("limit"), "path": lambda: order.append("path")}
    start = time.perf_counter()
    times = common.interleave(fns, 3, setup=lambda name: order.append(f"setup {name}"), warmup=0, settle_s=0.05)
    assert time.perf_counter() - start >= 6 * 0.05  # the pauses happened
    assert all(t < 0.05 for ts in times.values() for t in ts)  # and no timed call contains one
    assert order[:4] == ["setup limit", "limit", "setup path", "path"] and len(order) == 12
