"""Exhaustion (pools full of pinned blocks) and several processes sharing one disk store."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import torch

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.manager import OffloadManager
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.kvbuffer import BlockKVBuffer

SPEC = KVSpec(model_id="test/exh", num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", block_tokens=4,
              weights_revision="random-0")
MODEL = {"_name_or_path": "test/exh", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 32, "vocab_size": 64}


def engine(n: int, seed: int) -> BlockKVBuffer:
    buf = BlockKVBuffer(SPEC, n)
    buf.data.copy_(torch.randn(buf.data.shape, generator=torch.Generator().manual_seed(seed)))
    return buf


def test_full_pool_of_pinned_blocks_saves_nothing_and_evicts_nothing():
    config = OffloadConfig(host_bytes=4 * SPEC.bytes_per_block, prefetch=False)
    with OffloadManager(SPEC, config, model_config=MODEL) as m:
        first, src = np.arange(16, dtype=np.int32), engine(4, 0)
        m.store("a", first, src).wait(10)
        keys = m.keys(first)
        m.decider.index.pin(keys)  # in use: e.g. four loads in flight
        # store [b0..b3] -> no victim may go: the save is skipped, nothing raises or hangs
        m.store("b", np.arange(100, 116, dtype=np.int32), engine(4, 1)).wait(10)
        assert m.stats()["saves_skipped_no_room"] == 4
        assert m.lookup(np.arange(100, 116, dtype=np.int32)) == 0
        m.decider.index.unpin(keys)
        m.enqueue("c", first)
        plan = replace(m.plan("c"), split=0, restore_stop=4)
        dst = BlockKVBuffer(SPEC, 4)
        assert m.load("c", dst, plan).wait() == 4
        assert torch.equal(dst.data, src.data)  # the pinned blocks were never evicted
        # once unpinned, the next save evicts them as usual
        m.store("d", np.arange(200, 216, dtype=np.int32), engine(4, 2)).wait(10)
        assert m.lookup(np.arange(200, 216, dtype=np.int32)) == 16


WRITER = """
import sys, torch
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.spec import KVSpec
spec = KVSpec(model_id="test/exh", num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", block_tokens=4,
              weights_revision="random-0")
who = int(sys.argv[2])
with DiskTier(sys.argv[1], spec, 1 << 26, batch_max_blocks=4) as disk:
    for i in range(60):
        key = bytes([who]) + i.to_bytes(15, "little")
        disk.put_async([key], [torch.full((spec.bytes_per_block,), (who * 31 + i) % 251, dtype=torch.uint8)])
    disk.flush(60)
"""


def test_two_writer_processes_and_a_reader_share_one_store(tmp_path):
    store = tmp_path / "store"
    with DiskTier(store, SPEC, 1 << 26):
        pass  # created here; two other processes write while this one reads
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(w)]) for w in (1, 2)]
    reader = DiskTier(store, SPEC, 1 << 26)
    out = torch.empty(SPEC.bytes_per_block, dtype=torch.uint8)
    seen_wrong = 0
    while any(w.poll() is None for w in writers):
        for key in reader.keys()[:50]:
            if reader.get(key, out) is not None and int(out[0]) != (key[0] * 31 + int.from_bytes(key[1:], "little")) % 251:
                seen_wrong += 1
    assert all(w.wait(120) == 0 for w in writers)
    keys = reader.keys()
    assert len(keys) == 120 and reader.num_used == 120
    for key in keys:
        assert reader.get(key, out) is not None
        assert int(out[0]) == (key[0] * 31 + int.from_bytes(key[1:], "little")) % 251
    assert seen_wrong == 0
    reader.close()
