"""Helpers of the disk-tier tests: a small spec, deterministic blocks, real stores in temp dirs, raw LMDB edits."""

from __future__ import annotations

import lmdb
import torch

from kvtier.tiers.disk import env as diskenv
from kvtier.tiers.disk.format import lmdb_key
from kvtier.tiers.spec import KVSpec

SPEC = KVSpec(model_id="test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=16,
              weights_revision="random-0")
BF16 = SPEC.with_(dtype="bfloat16", model_id="test-bf16")


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(i: int, spec: KVSpec = SPEC) -> torch.Tensor:
    """A deterministic block of KV-like values for key i."""
    gen = torch.Generator().manual_seed(i)
    return (torch.randn(spec.block_shape, generator=gen) * 0.5).to(spec.torch_dtype)


def empty(spec: KVSpec = SPEC) -> torch.Tensor:
    return torch.empty(spec.block_shape, dtype=spec.torch_dtype)


def raw_env(path: str) -> lmdb.Environment:
    """The store opened with plain LMDB (the tier must be closed), to forge and damage values."""
    return lmdb.open(path, max_dbs=4, map_size=1 << 30)


def edit_value(path: str, spec: KVSpec, k: bytes, fn) -> None:
    env = raw_env(path)
    db = env.open_db(diskenv.BLOCKS_DB)
    with env.begin(write=True, db=db) as txn:
        value = bytearray(txn.get(lmdb_key(spec.fingerprint_bytes, k)))
        txn.put(lmdb_key(spec.fingerprint_bytes, k), bytes(fn(value)))
    env.close()



def kv_runs(buffer, block_index: int) -> list[memoryview]:
    """An `HFKVBuffer` block's bytes as writable memory runs in payload order (layer, K/V, head): a
    destination of `DiskTier.get_many` scattered over an engine's own KV, as a caller may give one."""
    s = buffer.spec
    run, per_head = s.block_tokens * s.head_dim * s.itemsize, buffer.num_tokens * s.head_dim * s.itemsize
    flats = [memoryview(t.detach().numpy()).cast("B") for pair in zip(buffer.keys, buffer.values) for t in pair]
    return [flat[h * per_head + block_index * run:h * per_head + (block_index + 1) * run]
            for flat in flats for h in range(s.num_kv_heads)]
