"""OffloadManagers with a remote tier on a real 3-master Redis Cluster: two processes with their own host
and disk tiers share a prompt through the cluster (bitwise-exact restore in the second); the planner and
the books see remote blocks; a remote that lost blocks makes them misses, recomputed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.manager import OffloadManager
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName
from kvtier.tiers.kvbuffer import BlockKVBuffer
from managerutil import MODEL, tiny_spec

NUM_BLOCKS = 12

# the first process: stores the prompt's KV (seeded), waits for the write-through to be acknowledged
WRITER = textwrap.dedent("""
    import sys, numpy as np, torch
    from kvtier.scheduler.config import OffloadConfig
    from kvtier.scheduler.manager import OffloadManager
    from kvtier.tiers.spec import KVSpec
    from kvtier.tiers.kvbuffer import BlockKVBuffer
    url, disk, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = KVSpec(model_id="test/tiny", num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32",
                  block_tokens=16, weights_revision="random-0")
    model = {"_name_or_path": "test/tiny", "num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 256}
    config = OffloadConfig(host_bytes=64 * spec.bytes_per_block, disk_bytes=64 * spec.bytes_per_block,
                           disk_path=disk, remote_url=url, remote_timeout_s=5.0, prefetch=False)
    prompt = np.random.default_rng(0).integers(0, 1000, n * 16 + 3).astype(np.int32)
    src = BlockKVBuffer(spec, n)
    src.data.copy_(torch.randn(src.data.shape, generator=torch.Generator().manual_seed(1)))
    with OffloadManager(spec, config, model_config=model) as m:
        m.store("w", prompt, src).wait(30)
        m.flush(30)
        stats = m.stats()
    assert stats["written_to_remote_blocks"] == n, stats
    print("stored", stats["remote"]["acknowledged_blocks"])
""")


@pytest.fixture
def spec() -> KVSpec:
    return tiny_spec()


def _config(spec: KVSpec, url: str, disk: str, **kw) -> OffloadConfig:
    b = spec.bytes_per_block
    return OffloadConfig(host_bytes=64 * b, disk_bytes=64 * b, disk_path=disk, remote_url=url, remote_timeout_s=5.0,
                         **kw)


def _prompt() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, NUM_BLOCKS * 16 + 3).astype(np.int32)


def _expected(spec: KVSpec) -> torch.Tensor:
    src = BlockKVBuffer(spec, NUM_BLOCKS)
    src.data.copy_(torch.randn(src.data.shape, generator=torch.Generator().manual_seed(1)))
    return src.data


@pytest.mark.parametrize("prefetch", [False, True])
def test_two_processes_share_a_prompt_through_the_cluster(spec, redis_cluster, tmp_path, prefetch):
    salt = f"share-{prefetch}"  # each case its own tenant: nothing left over from the other
    url = redis_cluster.url
    _store_in_another_process_salted(url, str(tmp_path / "disk-a"), salt)
    # the second process's own host and disk are empty: only the remote holds the prompt
    with OffloadManager(spec, _config(spec, url, str(tmp_path / "disk-b"), prefetch=prefetch, salt=salt),
                        model_config=MODEL) as m:
        prompt = _prompt()
        assert m.enqueue("r", prompt) == NUM_BLOCKS * 16
        plan = m.plan("r")
        assert plan.num_found_blocks == NUM_BLOCKS
        from dataclasses import replace

        plan = replace(plan, split=0, restore_stop=plan.num_found_blocks)  # restore every block
        dst = BlockKVBuffer(spec, NUM_BLOCKS)
        loading = m.load("r", dst, plan)
        assert loading.wait() == NUM_BLOCKS
        m.finish("r")
        assert torch.equal(dst.data, _expected(spec))  # bitwise
        stats = m.stats()
        assert stats["remote"]["hits"] + stats["prefetched_blocks"] >= NUM_BLOCKS
        # the restored blocks now live in this process's host tier too: the next lookup needs no remote
        assert stats["blocks_by_tier"]["host"] == NUM_BLOCKS


def _store_in_another_process_salted(url: str, disk: str, salt: str) -> None:
    script = WRITER.replace("prefetch=False)", f"prefetch=False, salt={salt!r})")
    done = subprocess.run([sys.executable, "-c", script, url, disk, str(NUM_BLOCKS)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"stored {NUM_BLOCKS}" in done.stdout


def test_blocks_the_remote_lost_are_misses_and_recomputed(spec, redis_cluster, tmp_path):
    url = redis_cluster.url
    salt = "lost"
    _store_in_another_process_salted(url, str(tmp_path / "disk-a"), salt)
    with OffloadManager(spec, _config(spec, url, str(tmp_path / "disk-b"), prefetch=False, salt=salt),
                        model_config=MODEL) as m:
        remote = m.tiers[TierName.REMOTE]
        keys = m.keys(_prompt())
        # the server evicted block 5 after the probe: the load delivers [0, 5) and the engine recomputes the rest
        assert m.enqueue("r", _prompt()) == NUM_BLOCKS * 16
        assert remote.delete(keys[5])
        plan = m.plan("r")
        from dataclasses import replace

        plan = replace(plan, split=0, restore_stop=plan.num_found_blocks)
        dst = BlockKVBuffer(spec, NUM_BLOCKS)
        assert m.load("r", dst, plan).wait() == 5
        m.finish("r")
        assert torch.equal(dst.data[:5], _expected(spec)[:5])
        # the next probe books only what the remote still holds: blocks [0, 5) are in host now, 6.. on the remote
        assert m.lookup(_prompt()) == 5 * 16
