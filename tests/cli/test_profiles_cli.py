"""`kvtier profiles`: the table, --json, custom profile files, errors and exit codes."""

from __future__ import annotations

import json

import pytest

from kvtier.scheduler.cli import main
from kvtier.scheduler.cost.fit import RecomputePoint, RestorePoint, fit_model
from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.cost.hardware import dumps_profile, load_profile

REQUIRED = ("h100-pcie5", "h100-sxm", "h200", "gh200", "a100-pcie4", "l4", "cpu-this-machine")


def test_lists_every_profile_with_its_numbers(capsys) -> None:
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert f"\n{name} " in out
    assert "TFLOP/s" in out and "link GB/s" in out and "recompute ms" in out
    h100 = next(line for line in out.splitlines() if line.startswith("h100-sxm "))
    assert " 989 " in h100 and " 50 " in h100 and "267.8" in h100  # docs/design.md's 267 ms for Llama-3-8B


def test_json_output(tmp_path, capsys) -> None:
    out = tmp_path / "profiles.json"
    assert main(["profiles", "--model", "llama-3-70b", "--tp", "8", "--tokens", "8192", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["model"], data["tp"], data["tokens"], data["block_tokens"]) == ("llama-3-70b", 8, 8192, 64)
    by_name = {p["name"]: p for p in data["profiles"]}
    assert set(REQUIRED) <= set(by_name)
    sxm = by_name["h100-sxm"]
    assert sxm["peak_flops"] == 989e12 and sxm["notes"]
    assert set(sxm["predicted_ms"]) == {"recompute", "host", "disk", "disk_zstd", "decode_step"}
    assert sxm["predicted_ms"]["recompute"] / sxm["predicted_ms"]["host"] > 30


def test_a_custom_profile_file(tmp_path, capsys) -> None:
    path = tmp_path / "lab.json"
    path.write_text(dumps_profile(load_profile("a100-pcie4").with_(name="lab-box", mfu=0.35).to_dict()))
    assert main(["profiles", "--profile", str(path), "--profile", "l4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("lab-box ") and " 0.35 " in line for line in lines)
    assert any(line.startswith("l4 ") for line in lines)
    assert not any(line.startswith("h200 ") for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["profiles", "--profile", "h900"], "'h900' is unknown"),
    (["profiles", "--model", "gpt-9"], "model preset: 'gpt-9' is unknown"),
    (["profiles", "--tokens", "0"], "--tokens: expected a positive int, got 0"),
    (["profiles", "--tp", "0"], "tp: expected a positive int, got 0"),
])
def test_errors_exit_2_with_a_message(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_profile_file_names_the_file(tmp_path, capsys) -> None:
    path = tmp_path / "bad.json"
    data = load_profile("l4").to_dict()
    data["mfu"] = 2
    path.write_text(json.dumps(data))
    assert main(["profiles", "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "mfu must be in (0, 1]" in err


def test_a_calibrated_profile_predicts_with_its_fitted_numbers(tmp_path, capsys) -> None:
    # what `kvtier calibrate --out` writes: the profile plus fitted coefficients for one model
    fitted = fit_model(CostModel.from_profile("cpu-this-machine", "smollm2-135m"),
        [RestorePoint("host", n, 0.001 * n) for n in (1, 2, 4)]
        + [RecomputePoint(s, n, 0.002 * n) for s in (0, 64) for n in (64, 128)])
    fitted.save(tmp_path / "calibrated.json")
    out = tmp_path / "out.json"
    argv = ["profiles", "--profile", str(tmp_path / "calibrated.json"), "--model", "smollm2-135m",
            "--tokens", "640", "--json", str(out)]
    assert main(argv) == 0
    assert "[measured: host, recompute]" in capsys.readouterr().out
    record = json.loads(out.read_text())["profiles"][0]
    assert record["fitted"] == ["host", "recompute"]
    assert record["predicted_ms"]["host"] == pytest.approx(10 * 1.0, rel=1e-6)        # 10 blocks x 1 ms
    assert record["predicted_ms"]["recompute"] == pytest.approx(640 * 2.0, rel=1e-6)  # 640 tokens x 2 ms
