"""`kvtier calibrate` and `kvtier bench scheduler` through the command line: outputs, schema, bad input."""

from __future__ import annotations

import json
import math

import pytest

from kvtier.scheduler.cli import main
from kvtier.scheduler.cost.model import CostModel

TINY = {"_name_or_path": "test/tiny-llama", "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 1024, "torch_dtype": "float32"}
ERROR_KEYS = ("restore_host_error", "restore_disk_error", "recompute_error", "median_abs_rel_error")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("calibrate")
    config = work / "config.json"
    config.write_text(json.dumps(TINY))
    out, report = work / "profile.json", work / "report.json"
    code = main(["calibrate", "--model", str(config), "--out", str(out), "--json", str(report), "--quick",
                 "--disk-dir", str(work / "disk"), "--block-tokens", "16"])
    return code, out, report


def test_quick_calibrate_writes_a_profile_that_loads_back(quick_run) -> None:
    code, out, report = quick_run
    assert code == 0
    model = CostModel.load(out)
    assert model.fitted == frozenset({"host", "disk", "recompute"}) and model.spec.block_tokens == 16
    for value in (model.restore_s("host", 4), model.restore_s("disk", 4), model.recompute_s(64, 64)):
        assert math.isfinite(value) and value > 0
    data = json.loads(report.read_text())
    for key in ERROR_KEYS:
        assert isinstance(data[key], float) and data[key] >= 0
    assert data["profile_path"] == str(out) and data["points"] and data["coefficients"]
    assert data["sweep"]["repeats"] >= 5


def test_check_against_the_saved_profile(quick_run, tmp_path, capsys) -> None:
    _, out, _ = quick_run
    report = tmp_path / "check.json"
    assert main(["calibrate", "--check", "--profile", str(out), "--quick", "--no-disk", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["restore_disk_error"] is None and data["recompute_error"] >= 0
    assert "errors of the saved model" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model", "--out", "{tmp}/p.json"], "'no-such-model' is neither a preset"),
    (["--model", "smollm2-135m", "--out", "{tmp}/missing/p.json"], "does not exist"),
    (["--model", "smollm2-135m", "--out", "{tmp}"], "is a directory"),
    (["--model", "smollm2-135m", "--out", "{tmp}/ro/p.json"], "is not writable"),
    (["--model", "smollm2-135m"], "--out is required"),
    (["--out", "{tmp}/p.json"], "--model is required"),
    (["--check"], "--check needs --profile"),
    (["--check", "--profile", "{tmp}/none.json"], "none.json"),
    (["--model", "smollm2-135m", "--out", "{tmp}/p.json", "--repeats", "2"], "repeats: expected an int >= 5"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        if message == "is not writable" and __import__("os").access(ro, __import__("os").W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert main(["calibrate", *args]) == 2
        assert message in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_bench_scheduler_json_schema(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "scheduler", "--index-blocks", "10000", "--repeats", "20", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("lookup_plan_ms", "lookup_ms", "codes_ms", "plan_ms", "lookup_then_plan_ms"):
        assert isinstance(data[key], float) and data[key] > 0
        assert data["spread_ms"][key]["min"] <= data[key] <= data["spread_ms"][key]["p90"] + 1e-9
        assert data["spread_ms"][key]["p90"] <= data["spread_ms"][key]["max"] + 1e-9
        assert data["spread"][key]["median"] == data[key] and data["spread"][key]["n"] == 20
    assert len(data["load_avg"]["start"]) == 3
    assert (data["index_blocks"], data["request_blocks"], data["matched_blocks"]) == (10000, 2048, 2048)
    assert data["request_tokens"] == 131072 and data["target_ms"] == 2.0
    assert data["plan"]["restore_stop"] >= data["plan"]["split"] >= 0
    assert "hashing" in data and "machine" in data
    assert "lookup_plan_ms" in capsys.readouterr().out


def test_bench_scheduler_rejects_an_index_smaller_than_the_request(capsys) -> None:
    assert main(["bench", "scheduler", "--index-blocks", "100"]) == 2
    assert "--index-blocks: 100 is fewer than the request's 2048 blocks" in capsys.readouterr().err
