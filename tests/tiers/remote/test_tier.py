"""RemoteTier against real redis-server processes: a single node and a 3-master cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.tiers.disk.format import HEADER_BYTES
from kvtier.tiers.errors import RemoteAuthError, RemoteError
from kvtier.tiers.keys import KeyChain
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.remote.settings import parse_remote_url
from kvtier.tiers.spec import KVSpec

redis = pytest.importorskip("redis", reason="the remote tier needs the 'remote' extra (redis-py)")


def _blocks(spec: KVSpec, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (spec.bytes_per_block,), dtype=torch.uint8, generator=gen) for _ in range(n)]


def _keys(spec: KVSpec, n: int, seed: int, salt: str = "") -> list[bytes]:
    tokens = np.random.default_rng(seed).integers(0, 50000, n * spec.block_tokens)
    return KeyChain.for_spec(spec, salt).keys(tokens)


def _raw(tier: RemoteTier, key: bytes) -> redis.Redis:
    """A plain client of the node holding `key` (to damage values behind the tier's back)."""
    groups, _ = tier.nodes.route([tier.redis_key(key)])
    node = next(iter(groups))
    return redis.Redis(connection_pool=node.pool)


@pytest.fixture
def tier(small_spec, remote_url):
    t = RemoteTier(small_spec, remote_url, timeout_s=5.0)
    yield t
    t.close()


def test_save_probe_load_roundtrip_bitwise(tier, small_spec):
    keys, blocks = _keys(small_spec, 24, 1), _blocks(small_spec, 24, 1)
    # save 24 blocks; every one acknowledged
    assert tier.save_many(keys, blocks) == []
    assert tier.stats().acknowledged_blocks == 24
    # the probe finds all 24, and stops at the first block never saved
    assert tier.probe(keys) == 24
    other = _keys(small_spec, 3, 99)
    assert tier.probe(keys[:5] + other + keys[5:]) == 5
    # load into host-like blocks: bitwise equal
    outs = [torch.empty(small_spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
    assert tier.get_many(keys, outs) == [True] * 24
    assert all(torch.equal(o, b) for o, b in zip(outs, blocks))


def test_load_into_memory_runs_and_on_landed(tier, small_spec):
    keys, blocks = _keys(small_spec, 9, 2), _blocks(small_spec, 9, 2)
    tier.save_many(keys, blocks)
    # an engine block as two memory runs (its payload split in the middle)
    mem = [torch.zeros(small_spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
    half = small_spec.bytes_per_block // 2
    runs = [[memoryview(m.numpy())[:half], memoryview(m.numpy())[half:]] for m in mem]
    landed: list[int] = []
    assert all(tier.get_many(keys, runs, on_landed=landed.extend, batch_blocks=2))
    assert sorted(landed) == list(range(9))
    assert all(torch.equal(m, b) for m, b in zip(mem, blocks))


def test_absent_damaged_and_foreign_values_are_counted_misses(tier, small_spec):
    keys, blocks = _keys(small_spec, 4, 3), _blocks(small_spec, 4, 3)
    tier.save_many(keys[:3], blocks[:3])
    # damage block 0's payload, put block 2's value under block 1's name (a well-formed foreign header)
    raw0 = _raw(tier, keys[0])
    value = bytearray(raw0.get(tier.redis_key(keys[0])))
    value[HEADER_BYTES + 5] ^= 0xFF
    raw0.set(tier.redis_key(keys[0]), bytes(value))
    _raw(tier, keys[1]).set(tier.redis_key(keys[1]), _raw(tier, keys[2]).get(tier.redis_key(keys[2])))
    before = tier.stats()
    outs = [torch.zeros(small_spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
    # damaged, foreign, good, absent
    assert tier.get_many(keys, outs) == [False, False, True, False]
    assert torch.equal(outs[2], blocks[2])
    after = tier.stats()
    assert (after.corrupt - before.corrupt, after.foreign - before.foreign, after.misses - before.misses) == (1, 1, 3)
    # a truncated value is damaged too
    _raw(tier, keys[2]).set(tier.redis_key(keys[2]), b"KVTB-short")
    assert tier.get_many([keys[2]], [outs[2]]) == [False]


def test_models_and_tenants_never_share_keys(small_spec, remote_url):
    other_model = KVSpec(model_id="test/other", num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32",
                         block_tokens=16, weights_revision="random-0")
    keys, blocks = _keys(small_spec, 3, 4), _blocks(small_spec, 3, 4)
    with RemoteTier(small_spec, remote_url, timeout_s=5.0) as a, \
            RemoteTier(other_model, remote_url, timeout_s=5.0) as b, \
            RemoteTier(small_spec, remote_url, timeout_s=5.0, salt="tenant-b") as c:
        a.save_many(keys, blocks)
        assert a.probe(keys) == 3
        # the same key bytes under another model or tenant: another Redis key, never found
        assert b.probe(keys) == 0 and c.probe(keys) == 0
        assert len({a.redis_key(keys[0]), b.redis_key(keys[0]), c.redis_key(keys[0])}) == 3


def test_put_async_acknowledged_on_reply(tier, small_spec):
    keys, blocks = _keys(small_spec, 6, 5), _blocks(small_spec, 6, 5)
    committed: list[bytes] = []
    handle = tier.put_async(keys, blocks, on_commit=committed.extend)
    handle.wait(10)
    assert handle.failed == () and sorted(committed) == sorted(keys)
    assert tier.probe(keys) == 6


def test_wrong_password_is_a_clear_error_at_start(small_spec, redis_single):
    assert redis_single.password
    port = redis_single.ports[0]
    with pytest.raises(RemoteAuthError, match="refused the credentials") as err:
        RemoteTier(small_spec, f"redis://:wrong-pw@127.0.0.1:{port}", timeout_s=2.0)
    assert "wrong-pw" not in str(err.value)
    with pytest.raises(RemoteAuthError, match="refused the credentials"):
        RemoteTier(small_spec, f"redis://127.0.0.1:{port}", timeout_s=2.0)
    # the password from the environment works
    settings = parse_remote_url(f"redis://127.0.0.1:{port}", 2.0, env={"KVTIER_REMOTE_PASSWORD": redis_single.password})
    RemoteTier(small_spec, settings).close()


def test_no_reachable_node_is_a_clear_error_at_start(small_spec, redis_cluster):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError, match="no node answered"):
        RemoteTier(small_spec, f"redis://127.0.0.1:{port}", timeout_s=1.0)
    with pytest.raises(RemoteError, match="not in cluster mode|no node answered"):
        RemoteTier(small_spec, f"redis+cluster://127.0.0.1:{port}", timeout_s=1.0)


def test_tls_node(small_spec):
    import shutil

    from kvtier.tiers.remote.local import LocalRedis

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (the test's certificates)")
    keys, blocks = _keys(small_spec, 5, 8), _blocks(small_spec, 5, 8)
    with LocalRedis(0, tls=True, password="tls-pw") as server:
        assert server.url.startswith("rediss://")
        with RemoteTier(small_spec, server.url, timeout_s=5.0) as tier:
            assert tier.save_many(keys, blocks) == []
            outs = [torch.empty(small_spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
            assert all(tier.get_many(keys, outs))
            assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
            assert tier.describe()["url"].startswith("rediss://:***@")
        # without the CA the server's certificate is refused: a clear error at start
        with pytest.raises(RemoteError, match="no node answered"):
            RemoteTier(small_spec, server.url.split("?")[0], timeout_s=2.0)
