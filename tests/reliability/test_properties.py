"""Property-based tests (hypothesis): parsers never crash on arbitrary input; random sequences of
OffloadManager calls never serve wrong KV, never exceed a capacity and never leak a pin."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.manager import OffloadManager
from kvtier.scheduler.replay.traces import TraceFormat, read_trace
from kvtier.tiers.errors import TraceFormatError
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.kvbuffer import BlockKVBuffer

SPEC = KVSpec(model_id="test/prop", num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", block_tokens=4,
              weights_revision="random-0")
MODEL = {"_name_or_path": "test/prop", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 32, "vocab_size": 64}

lines = st.one_of(
    st.text(max_size=80),
    st.builds(lambda ts, n, ids: f'{{"timestamp": {ts}, "input_length": {n}, "output_length": 1, "hash_ids": {ids}}}',
              st.integers(-5, 10**6), st.integers(-5, 5000), st.lists(st.integers(-3, 50), max_size=6)),
    st.builds(lambda a, b, c: f"{a},{b},{c}", st.text(max_size=12), st.text(max_size=6), st.text(max_size=6)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines, max_size=6), st.sampled_from(list(TraceFormat)))
def test_parsers_error_or_parse(body, fmt):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("t.csv" if fmt.value.startswith("azure") else "t.jsonl")
        header = "TIMESTAMP,ContextTokens,GeneratedTokens\n" if fmt.value.startswith("azure") else ""
        path.write_text(header + "\n".join(body))
        try:
            read_trace(path, fmt)
        except TraceFormatError as err:
            assert "t." in str(err)  # the message names the file
        try:
            read_trace(path, fmt, skip_bad=True)
        except TraceFormatError:
            pass  # e.g. an unreadable header; never another exception


def content(key: bytes) -> torch.Tensor:
    """What a block with this key holds (the engine's KV is a function of the prefix)."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return torch.randn(SPEC.block_shape, generator=torch.Generator().manual_seed(seed))


def prompt(base: int, length: int) -> np.ndarray:
    # prompts of one family share prefixes: base picks a family, length how much of it
    return (np.arange(length, dtype=np.int32) * 7 + base * 1000) % 997


ops = st.lists(st.tuples(st.sampled_from(["store", "load", "enqueue", "cancel", "lookup", "finish"]),
                         st.integers(0, 2), st.integers(1, 6)), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops, st.sampled_from(["lru", "fifo", "arc", "s3fifo"]), st.sampled_from(["write-through", "write-back"]),
       st.booleans())
def test_random_manager_calls(tmp_path_factory, sequence, policy, write_mode, prefetch):
    b = SPEC.bytes_per_block
    config = OffloadConfig(gpu_bytes=3 * b, host_bytes=4 * b, disk_bytes=12 * b,
                           disk_path=str(tmp_path_factory.mktemp("store")), policy=policy, write_mode=write_mode,
                           prefetch=prefetch, load_timeout_s=30)
    with OffloadManager(SPEC, config, model_config=MODEL) as m:
        for n, (op, family, num_blocks) in enumerate(sequence):
            tokens = prompt(family, num_blocks * 4 + 1)
            rid = f"r{n}"
            keys = m.keys(tokens)
            if op == "store":
                engine = BlockKVBuffer(SPEC, len(keys))
                for i, k in enumerate(keys):
                    engine.data[i] = content(k)
                m.store(rid, tokens, engine).wait(30)
                m.finish(rid)
            elif op == "load":
                m.enqueue(rid, tokens)
                plan = m.plan(rid)
                plan = replace(plan, split=0, restore_stop=plan.num_found_blocks)
                dst = BlockKVBuffer(SPEC, len(keys))
                loading = m.load(rid, dst, plan)
                good = loading.wait()
                for i in range(loading.restore_start, loading.restore_start + good):
                    assert torch.equal(dst.data[i], content(keys[i])), "wrong KV served"
                m.finish(rid)
            elif op == "enqueue":
                m.enqueue(rid, tokens)
            elif op == "cancel":
                m.cancel(f"r{n - 1}")
            elif op == "lookup":
                assert m.lookup(tokens) % SPEC.block_tokens == 0
            else:
                m.finish(f"r{n - 1}")
            usage = m.stats()["blocks_by_tier"]
            assert usage.get("gpu", 0) <= 3 and usage["host"] <= 4 and usage["disk"] <= 12
        m.flush()
        leaked = m.decider.index.pinned_keys()
        assert not leaked, f"{len(leaked)} blocks still pinned after every request ended"
