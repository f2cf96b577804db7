"""The connector's byte half without an engine: `VllmKVBuffer` over paged tensors shaped like vLLM's CPU
cache, and `WorkerSide` running the real `Decider`'s commands against a real host pool and LMDB store.

Covers: a save copies vLLM pages into host slots byte for byte and is written through to disk; after a
restart (new worker, new decider rebuilt from the store's listing) a load from disk puts the same bytes
into other vLLM blocks; a block whose disk value was damaged is reported by vLLM block id (it and every
later block of the load) and dropped from the decider's books.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from kvtier.scheduler.config import OffloadConfig  # noqa: E402
from kvtier.scheduler.decider import Decider  # noqa: E402
from kvtier.scheduler.engines.vllm.buffer import VllmKVBuffer  # noqa: E402
from kvtier.scheduler.engines.vllm.connector import parse_config
from kvtier.scheduler.engines.vllm.metadata import KvtierMeta  # noqa: E402
from kvtier.scheduler.engines.vllm.worker import WorkerSide  # noqa: E402
from kvtier.tiers.disk.store import DiskTier  # noqa: E402
from kvtier.tiers.errors import ConfigError  # noqa: E402
from kvtier.tiers.keys import KeyChain  # noqa: E402
from kvtier.tiers.spec import KVSpec  # noqa: E402

SPEC = KVSpec(model_id="test/tiny", weights_revision="random-0", num_layers=4, num_kv_heads=2, head_dim=8,
              dtype="float32", kv_factor=2, block_tokens=16, layout="vllm-cpu-vec/1")
NUM_BLOCKS = 12


def paged_kv() -> dict[str, torch.Tensor]:
    """Per-layer views of one allocation, `[num_blocks, heads, block_tokens, 2 * head_dim]` (vLLM's CPU cache)."""
    data = torch.randn(SPEC.num_layers, NUM_BLOCKS, SPEC.num_kv_heads, SPEC.block_tokens, 2 * SPEC.head_dim)
    return {f"model.layers.{i}.self_attn.attn": data[i] for i in range(SPEC.num_layers)}


def config(tmp_path: Path) -> OffloadConfig:
    return OffloadConfig(host_bytes=8 * SPEC.bytes_per_block, disk_bytes=32 * SPEC.bytes_per_block,
                         disk_path=str(tmp_path / "store"), prefetch=False)


def run_step(worker: WorkerSide, kv: VllmKVBuffer, before=(), after=()) -> set[int]:
    meta = KvtierMeta(list(before), list(after))
    worker.start_step(meta)
    for name in kv.names:
        worker.wait_layer(name)
    worker.end_step(meta)
    return worker.take_load_errors()


def test_save_then_restore_from_disk_after_restart_with_a_damaged_block(tmp_path: Path) -> None:
    import lmdb

    from kvtier.tiers.disk import env as diskenv
    from kvtier.tiers.disk.format import HEADER_BYTES, lmdb_key

    cfg = config(tmp_path)
    keys = KeyChain.for_spec(SPEC).keys(list(range(3 * SPEC.block_tokens)))
    caches = paged_kv()
    kv = VllmKVBuffer(SPEC, caches)
    worker = WorkerSide(SPEC, cfg)
    worker.register(kv)
    decider = Decider(SPEC, cfg)
    src = [3, 5, 6]
    assert run_step(worker, kv, after=decider.start_save("r1", keys, src)) == set()
    slot = decider.index.slot(keys[0], "host")
    page = worker.executor.tiers["host"].pool.block(slot).view(torch.float32).view(SPEC.num_layers, -1)
    assert all(torch.equal(page[layer], caches[name][3].reshape(-1)) for layer, name in enumerate(kv.names))
    follow = [c for done in worker.take_completions() for c in decider.complete(done)]
    assert [type(c).__name__ for c in follow] == ["Move"]  # write-through to disk
    run_step(worker, kv, before=follow)
    worker.close()  # commits the disk writes

    env = lmdb.open(cfg.disk_path, max_dbs=4, map_size=1 << 30)
    with env.begin(write=True, db=env.open_db(diskenv.BLOCKS_DB, create=False)) as txn:
        lk = lmdb_key(SPEC.fingerprint_bytes, keys[1])
        value = bytearray(txn.get(lk))
        value[HEADER_BYTES + 7] ^= 0x01
        txn.put(lk, bytes(value))
    env.close()

    worker = WorkerSide(SPEC, cfg)  # a restarted engine: new worker, decider rebuilt from the listing
    fresh = paged_kv()
    kv2 = VllmKVBuffer(SPEC, fresh)
    worker.register(kv2)
    decider = Decider(SPEC, cfg)
    listing = DiskTier(cfg.disk_path, SPEC, cfg.disk_bytes, readonly=True)
    assert decider.rebuild_from_disk(listing.keys()) == 3
    listing.close()
    load = decider.start_load("r2", keys, 0, 3, [7, 9, 10])
    assert load is not None and [str(t) for t in load.src_tiers] == ["disk"] * 3
    errors = run_step(worker, kv2, before=decider.take_prepared() + [load])
    assert errors == {9, 10}  # block 1 failed its checksum: it and the rest are recomputed by vLLM
    for layer, name in enumerate(kv2.names):
        assert torch.equal(fresh[name][7], caches[name][3])
    for done in worker.take_completions():
        decider.complete(done)
    assert [e.key for e in decider.lookup(keys)] == keys[:1]
    worker.close()


def test_config_rejects_unknown_keys_and_a_gpu_pool() -> None:
    with pytest.raises(ConfigError, match="unknown key.*host_gb"):
        parse_config({"host_gb": 4})
    with pytest.raises(ConfigError, match="gpu_bytes=.*expected 0 under vLLM"):
        parse_config({"gpu_bytes": "1GiB"})


def test_buffer_rejects_a_mismatched_cache() -> None:
    caches = paged_kv()
    with pytest.raises(ConfigError, match="3 layers, expected 4"):
        VllmKVBuffer(SPEC, dict(list(caches.items())[:3]))
