"""Calibration: real rigs (host pool, cold LMDB store, a tiny random-weight Llama) measured, split, fitted.

A tiny HF config (2 layers, hidden 64) keeps the prefill cheap; the sweep is QUICK_SWEEP shrunk further.
"""

from __future__ import annotations

import json
import math

import pytest

from kvtier.scheduler.cost.calibrate import (KINDS, QUICK_SWEEP, Measured, Sweep, calibrate, check, error_summary,
                                        resolve_model, split)
from kvtier.scheduler.cost.model import CostModel
from kvtier.tiers.errors import ConfigError

pytest.importorskip("transformers")

TINY = {"_name_or_path": "test/tiny-llama", "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 1024, "torch_dtype": "float32"}
SMALL = Sweep(restore_blocks=(1, 2, 3, 4, 6),
              recompute_points=((0, 16), (0, 32), (0, 64), (64, 16), (64, 32), (64, 64)),
              repeats=5, warmup=1, restore_samples=1, disk_samples=1)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return calibrate(TINY, SMALL, disk_dir=str(tmp_path_factory.mktemp("disk")), block_tokens=16)


def test_report_has_every_key_and_held_out_points(result) -> None:
    report = result.report
    for key in ("restore_host_error", "restore_disk_error", "recompute_error", "median_abs_rel_error"):
        assert isinstance(report[key], float) and report[key] >= 0
    roles = [p["role"] for p in report["points"]]
    assert roles.count("held_out") == report["num_held_out"] > 0 and roles.count("fit") > 0
    assert {p["kind"] for p in report["points"]} == set(KINDS)
    assert all(len(p["samples"]) == SMALL.repeats for p in report["points"])
    assert set(report["coefficients"]) == {"host", "disk", "recompute"}
    json.dumps(report)  # serialisable as is


def test_profile_round_trips_and_predicts_finite_positive_times(result, tmp_path) -> None:
    path = tmp_path / "profile.json"
    result.model.save(path)
    loaded = CostModel.load(path)
    assert loaded.fitted == frozenset({"host", "disk", "recompute"})
    assert loaded.paths["host"] == result.model.paths["host"]
    assert loaded.recompute == result.model.recompute
    for value in (loaded.restore_s("host", 8), loaded.restore_s("disk", 8), loaded.recompute_s(128, 64)):
        assert math.isfinite(value) and value > 0
    # the errors reported are those of the saved model on the held-out points
    held = [p for p in result.report["points"] if p["role"] == "held_out"]
    for p in held:
        if p["kind"] == "recompute":
            predicted = loaded.recompute_s(p["start_tokens"], p["num_tokens"])
        else:
            predicted = loaded.restore_s("host" if p["kind"] == "restore_host" else "disk", p["num_blocks"])
        assert predicted == pytest.approx(p["predicted_s"], rel=1e-9)


def test_check_reports_errors_of_a_saved_model(result, tmp_path) -> None:
    report = check(result.model, SMALL, disk_dir=None)
    assert report["restore_disk_error"] is None  # no disk directory: not measured
    assert report["restore_host_error"] >= 0 and report["recompute_error"] >= 0
    assert all(p["role"] == "check" for p in report["points"])


def test_split_alternates_by_size_and_keeps_the_extremes_in_the_fit() -> None:
    points = [Measured("restore_host", n, [1.0]) for n in (8, 1, 4, 2, 16)]
    points += [Measured("recompute", (s, n), [1.0]) for s in (0, 64) for n in (16, 32)]
    fit, held = split(points)
    assert sorted(p.size for p in fit if p.kind == "restore_host") == [1, 4, 16]
    assert sorted(p.size for p in held if p.kind == "restore_host") == [2, 8]
    assert sorted(p.size for p in fit if p.kind == "recompute") == [(0, 16), (64, 32)]
    assert sorted(p.size for p in held if p.kind == "recompute") == [(0, 32), (64, 16)]


def test_error_summary_is_the_median_relative_error(result) -> None:
    model = result.model
    exact = Measured("restore_host", 4, [model.restore_s("host", 4)])
    off = Measured("restore_host", 8, [model.restore_s("host", 8) / 2])  # predicted twice the measured: error 1
    summary = error_summary(model, [exact, off, Measured("restore_host", 2, [model.restore_s("host", 2)])])
    assert summary["restore_host_error"] == 0 and summary["median_abs_rel_error"] == 0
    assert summary["recompute_error"] is None
    assert error_summary(model, [off])["restore_host_error"] == pytest.approx(1.0)


def test_resolve_model(tmp_path) -> None:
    assert resolve_model("SmolLM2-135M")[0] == "smollm2-135m"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    name, config = resolve_model(str(path))
    assert name == "test/tiny-llama" and config["hidden_size"] == 64
    with pytest.raises(ConfigError, match="'no-such-model' is neither a preset"):
        resolve_model("no-such-model")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected an object"):
        resolve_model(str(path))
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_model(str(path))


def test_sweep_rejects_too_few_repeats_or_points() -> None:
    with pytest.raises(ConfigError, match="repeats: expected an int >= 5"):
        Sweep(restore_blocks=(1, 2, 3), recompute_points=QUICK_SWEEP.recompute_points, repeats=3)
    with pytest.raises(ConfigError, match="restore_blocks"):
        Sweep(restore_blocks=(1, 1, 2), recompute_points=QUICK_SWEEP.recompute_points)
    with pytest.raises(ConfigError, match="recompute_points"):
        Sweep(restore_blocks=(1, 2, 3), recompute_points=((0, 16),))
