"""KVSpec and block keys: the docs/design.md test vectors, presets, and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvtier.tiers.errors import ConfigError
from kvtier.tiers import keys as keys_module
from kvtier.tiers.keys import KeyChain, as_int32_le, chain_keys, namespace, python_chain, root_key, trace_key
from kvtier.tiers.spec import PRESETS, KVSpec

SMOL = {"block_tokens": 64, "dtype": "float32", "head_dim": 64, "kv_factor": 2,
        "layout": "layer-kv-head-token-dim/1", "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "num_kv_heads": 3, "num_layers": 30, "weights_revision": ""}


def test_fingerprint_test_vector():
    spec = KVSpec(**SMOL)
    assert spec.fingerprint == "40c1012bee2c65fd2ace503353cb9b02"
    assert spec.canonical_json() == ('{"block_tokens":64,"dtype":"float32","head_dim":64,"kv_factor":2,'
                                     '"layout":"layer-kv-head-token-dim/1","model_id":"HuggingFaceTB/SmolLM2-135M-Instruct",'
                                     '"num_kv_heads":3,"num_layers":30,"weights_revision":""}')


def test_key_test_vectors():
    ns = namespace("40c1012bee2c65fd2ace503353cb9b02")
    assert root_key(ns).hex() == "da80946292315c26fcd8facb5ee3b925"
    keys = chain_keys(np.arange(128), 64, ns)
    assert [k.hex() for k in keys] == ["edd3e409619fd1b163025ee56326cb54", "4cfcaf4af41ddb2cf4a358a40de9ce9f"]


def test_python_loop_gives_the_test_vectors():
    # the fallback used where the C extension is not built: the same keys
    ns = namespace("40c1012bee2c65fd2ace503353cb9b02")
    data = as_int32_le(np.arange(128)).tobytes()
    assert [k.hex() for k in python_chain(data, 64 * 4, root_key(ns), 2)] == [
        "edd3e409619fd1b163025ee56326cb54", "4cfcaf4af41ddb2cf4a358a40de9ce9f"]


@pytest.mark.parametrize("block_tokens", [1, 3, 16, 27, 28, 29, 32, 60, 64, 256, 1000])
def test_backend_matches_python_loop(block_tokens):
    # block sizes around BLAKE2b's 128-byte chunk (the 16-byte parent plus 112 bytes = 28 tokens fill the
    # first chunk exactly) and a parent other than the root
    tokens = np.random.default_rng(block_tokens).integers(0, 2**31 - 1, 4000)
    ns = namespace(bytes(range(16)), salt="t")
    parent = root_key(b"another parent")
    want = python_chain(as_int32_le(tokens).tobytes(), block_tokens * 4, parent, len(tokens) // block_tokens)
    assert chain_keys(tokens, block_tokens, ns, parent=parent) == want
    assert chain_keys(tokens, block_tokens, ns, parent=parent, max_blocks=3) == want[:3]
    assert chain_keys(tokens[: block_tokens - 1], block_tokens, ns) == []


def test_c_backend_is_built_where_a_compiler_is():
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the Python loop is the backend")
    assert keys_module.HASH_BACKEND == "c"


def test_keys_same_for_numpy_torch_and_list():
    import torch

    chain = KeyChain.for_spec(KVSpec(**SMOL))
    tokens = np.random.default_rng(1).integers(0, 50000, 300)
    assert chain.keys(tokens) == chain.keys(torch.from_numpy(tokens)) == chain.keys(tokens.tolist())
    assert len(chain.keys(tokens)) == 4  # 300 tokens: 4 full blocks, the partial one gets no key


def test_keys_stable_across_processes():
    code = ("import numpy as np; from kvtier.tiers.keys import KeyChain; "
            "print(KeyChain('40c1012bee2c65fd2ace503353cb9b02', 64).keys(np.arange(128))[1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == "4cfcaf4af41ddb2cf4a358a40de9ce9f"


def test_chained_prefix_semantics():
    chain = KeyChain("40c1012bee2c65fd2ace503353cb9b02", 4)
    a = chain.keys(np.array([1, 2, 3, 4, 5, 6, 7, 8]))
    b = chain.keys(np.array([1, 2, 3, 4, 5, 6, 7, 9]))
    assert a[0] == b[0] and a[1] != b[1]
    assert chain.extend(a[0], np.array([5, 6, 7, 8])) == a[1:]
    # another salt (tenant) or another model: no shared keys
    assert KeyChain("40c1012bee2c65fd2ace503353cb9b02", 4, salt="tenant-b").keys(np.arange(8)) != chain.keys(np.arange(8))


def test_weights_revision_changes_fingerprint():
    a = KVSpec.from_preset("smollm2-135m", weights_revision="random-0")
    b = KVSpec.from_preset("smollm2-135m", weights_revision="0123456789abcdef")
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize("name, per_token", [("llama-3-8b", 131072), ("llama-2-7b", 524288), ("llama-3-70b", 327680),
                                             ("qwen2.5-7b", 57344), ("mistral-7b", 131072),
                                             ("deepseek-v3", 61 * 576 * 2), ("smollm2-135m", 30 * 2 * 3 * 64 * 4)])
def test_preset_geometries(name, per_token):
    spec = KVSpec.from_preset(name)
    assert spec.bytes_per_token == per_token
    assert spec.bytes_per_block == per_token * spec.block_tokens
    assert spec.block_shape[0] == spec.num_layers


def test_mla_preset_is_one_latent():
    spec = KVSpec.from_preset("deepseek-v3")
    assert (spec.kv_factor, spec.num_kv_heads, spec.head_dim) == (1, 1, 576)


def test_from_hf_config_dict():
    spec = KVSpec.from_hf_config({"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "hidden_size": 64, "torch_dtype": "bfloat16"}, model_id="x", block_tokens=16)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (2, 2, 16, "bfloat16")


def test_layer_groups_cover_all_layers():
    spec = KVSpec.from_preset("llama-3-8b")
    groups = spec.layer_groups(5)
    assert groups[0][0] == 0 and groups[-1][1] == 32
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    lo, hi = spec.layer_range(2, 4)
    assert hi - lo == 2 * spec.layer_bytes


def test_trace_key_is_16_bytes_and_distinct():
    assert len(trace_key(5)) == 16 and trace_key(5) != trace_key(6)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_layers": 0}, "num_layers"),
    ({"kv_factor": 3}, "kv_factor"),
    ({"dtype": "float64"}, "dtype"),
    ({"block_tokens": -1}, "block_tokens"),
    ({"model_id": ""}, "model_id"),
])
def test_bad_spec_fields(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KVSpec(**{**SMOL, **kwargs})


def test_bad_preset_and_config():
    with pytest.raises(ConfigError, match="unknown"):
        KVSpec.from_preset("gpt-7")
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        KVSpec.from_hf_config({"hidden_size": 64})
    with pytest.raises(ConfigError, match="block_tokens"):
        KeyChain("40c1012bee2c65fd2ace503353cb9b02", 0)
    with pytest.raises(ConfigError, match="fingerprint"):
        namespace(b"short")
    with pytest.raises(ConfigError, match="integers"):
        chain_keys(np.array([0.5, 1.5]), 1, namespace(bytes(16)))


def test_presets_are_real_configs():
    for name, config in PRESETS.items():
        assert config["num_hidden_layers"] > 0, name


def test_layer_groups_grow_by_the_factor_given_and_cover_every_layer():
    spec = KVSpec.from_preset("llama-3-8b").with_(num_layers=30)
    assert spec.layer_groups(4, 2.0) == [(0, 2), (2, 6), (6, 14), (14, 30)]  # 1 : 2 : 4 : 8
    assert spec.layer_groups(4, 0.5) == [(0, 16), (16, 24), (24, 28), (28, 30)]
    assert spec.layer_groups(4, 1.0) == spec.layer_groups(4) == [(0, 8), (8, 15), (15, 22), (22, 30)]
    for n in range(1, 31):
        for growth in (0.1, 0.5, 1.0, 1.5, 3.0, 10.0):
            groups = spec.layer_groups(n, growth)
            assert len(groups) == n and groups[0][0] == 0 and groups[-1][1] == 30
            assert all(lo < hi for lo, hi in groups) and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    for bad in (0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ConfigError, match="growth"):
            spec.layer_groups(4, bad)
