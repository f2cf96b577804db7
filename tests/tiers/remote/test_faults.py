"""A cluster node SIGKILLed during loads and saves: its blocks become misses, the others still restore,
no call waits past its deadline, nothing wrong is delivered; once it is back, saves go on."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from kvtier.tiers.keys import KeyChain
from kvtier.tiers.remote import RemoteTier
from kvtier.tiers.remote.local import LocalRedis
from kvtier.tiers.remote.tier import MIN_BYTES_PER_S

TIMEOUT_S = 2.0

pytest.importorskip("redis", reason="the remote tier needs the 'remote' extra (redis-py)")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture
def cluster():
    """A cluster of its own: this test kills one of its nodes."""
    with LocalRedis(3) as c:
        yield c


def _saved_prompt(tier: RemoteTier, spec, offset: int, seed: int) -> tuple[list[bytes], list[torch.Tensor]]:
    """The keys of a 48-block prompt and random blocks for them, saved through `tier` (all acknowledged)."""
    keys = KeyChain.for_spec(spec).keys(np.arange(48 * spec.block_tokens) + offset)
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randint(0, 256, (spec.bytes_per_block,), dtype=torch.uint8, generator=gen) for _ in keys]
    assert tier.save_many(keys, blocks) == []
    return keys, blocks


def _node_of(tier: RemoteTier, key: bytes) -> int:
    groups, _ = tier.nodes.route([tier.redis_key(key)])
    return next(iter(groups)).port


def test_sigkill_node_during_loads_and_saves(cluster, small_spec):
    spec = small_spec
    tier = RemoteTier(spec, cluster.url, timeout_s=TIMEOUT_S)
    try:
        keys = KeyChain.for_spec(spec).keys(np.arange(64 * spec.block_tokens))
        gen = torch.Generator().manual_seed(7)
        blocks = [torch.randint(0, 256, (spec.bytes_per_block,), dtype=torch.uint8, generator=gen) for _ in keys]
        assert tier.save_many(keys, blocks) == []
        victim = 1
        on_victim = {k for k in keys if _node_of(tier, k) == cluster.ports[victim]}
        assert 0 < len(on_victim) < len(keys), "the keys spread over the three masters"
        limit_s = TIMEOUT_S + len(keys) * spec.bytes_per_block / MIN_BYTES_PER_S + 1.0

        # loads run in a loop on one thread, saves of fresh copies on another, while the node is killed
        stop = threading.Event()
        first_load, three_after_kill = threading.Event(), threading.Event()
        killed_at: list[int] = []
        results: list[tuple[list[bool], list[torch.Tensor], float]] = []
        save_failures: list[int] = []

        def loads() -> None:
            while not stop.is_set():
                outs = [torch.zeros(spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
                start = time.monotonic()
                found = tier.get_many(keys, outs)
                results.append((found, outs, time.monotonic() - start))
                first_load.set()
                if killed_at and len(results) >= killed_at[0] + 4:
                    three_after_kill.set()

        def saves() -> None:
            while not stop.is_set():
                save_failures.append(len(tier.save_many(keys[:16], blocks[:16])))

        threads = [threading.Thread(target=loads), threading.Thread(target=saves)]
        for t in threads:
            t.start()
        assert first_load.wait(30)
        cluster.kill(victim)  # SIGKILL while loads and saves are in flight
        count = len(results)
        killed_at.append(count)
        # a few more loads run against the dead node (each bounded by its deadline)
        assert three_after_kill.wait(4 * limit_s)
        stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a load or save hung"

        for found, outs, took in results:
            assert took < limit_s, f"a load took {took:.1f} s, more than its deadline"
            for key, ok, out, block in zip(keys, found, outs, blocks):
                if ok:  # whatever was delivered is exactly what was saved
                    assert torch.equal(out, block)
        after = [found for found, _, _ in results[count + 1:]]
        assert after, "loads ran after the kill"
        for found in after:  # once the node is gone, its blocks miss and the others still restore
            assert all(ok == (k not in on_victim) for k, ok in zip(keys, found))
        assert tier.stats().unavailable > 0

        # the node comes back (empty: a cache keeps nothing); saves go on and its blocks restore again
        cluster.restart(victim)
        # the tier retries a failed node by itself once its back-off (nodes.RETRY_S) has run out
        backoff_s = max(n.down_until for n in tier.nodes.nodes) - time.monotonic()
        threading.Event().wait(max(0.0, backoff_s) + 0.05)
        assert tier.save_many(keys, blocks) == []
        outs = [torch.zeros(spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
        assert all(tier.get_many(keys, outs))
        assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
    finally:
        tier.close()


def test_moved_slots_are_misses_then_found_after_the_slot_map_reloads(cluster, small_spec):
    import subprocess

    from kvtier.tiers.remote.nodes import REFRESH_S

    spec = small_spec
    tier = RemoteTier(spec, cluster.url, timeout_s=TIMEOUT_S)
    try:
        keys, blocks = _saved_prompt(tier, spec, offset=7, seed=8)

        def node_id(port: int) -> str:
            return subprocess.run(["redis-cli", "-p", str(port), "cluster", "myid"], capture_output=True, text=True,
                                  timeout=30, check=True).stdout.strip()

        src, dst = cluster.ports[0], cluster.ports[1]
        # move 2000 of node 0's slots (and their keys) to node 1 behind the tier's back: its slot map is stale
        subprocess.run(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src}", "--cluster-from", node_id(src),
                        "--cluster-to", node_id(dst), "--cluster-slots", "2000", "--cluster-yes"],
                       capture_output=True, text=True, timeout=120, check=True)
        with RemoteTier(spec, cluster.url, timeout_s=TIMEOUT_S) as fresh:  # the slot map as it is now
            moved = {k for k in keys if _node_of(tier, k) != _node_of(fresh, k)}
        assert moved and len(moved) < len(keys)
        outs = [torch.zeros(spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
        found = tier.get_many(keys, outs)
        # the blocks in moved slots answered MOVED: misses; every other block restores, exactly
        assert found == [k not in moved for k in keys]
        assert all(torch.equal(o, b) for o, b, ok in zip(outs, blocks, found) if ok)
        # the MOVED replies reloaded the slot map (at most once per REFRESH_S): every block is found again
        threading.Event().wait(REFRESH_S)
        tier.nodes.refresh()
        outs = [torch.zeros(spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
        assert all(tier.get_many(keys, outs))
        assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
    finally:
        tier.close()


def test_master_killed_its_replica_takes_over(small_spec):
    import subprocess

    from kvtier.tiers.remote.nodes import REFRESH_S

    spec = small_spec
    with LocalRedis(3, replicas=1) as cluster:
        tier = RemoteTier(spec, cluster.url, timeout_s=TIMEOUT_S)
        try:
            keys, blocks = _saved_prompt(tier, spec, offset=11, seed=9)
            masters = [cluster.ports.index(n.port) for n in tier.nodes.masters]
            assert len(masters) == 3
            for i in masters:  # every write reached its replica before the kill
                done = subprocess.run(["redis-cli", "-p", str(cluster.ports[i]), "wait", "1", "10000"], check=True,
                                      capture_output=True, text=True, timeout=30)
                assert done.stdout.strip() == "1"
            victim = masters[0]
            on_victim = {k for k in keys if _node_of(tier, k) == cluster.ports[victim]}
            cluster.kill(victim)
            # failover in progress: the dead master's blocks miss, the rest restore; nothing raises
            outs = [torch.zeros(spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
            start = time.monotonic()
            found = tier.get_many(keys, outs)
            assert time.monotonic() - start < TIMEOUT_S + len(keys) * spec.bytes_per_block / MIN_BYTES_PER_S + 1
            assert found == [k not in on_victim for k in keys]
            # the replica wins the election; once the tier reloads its slot map every block restores again
            cluster.wait_failover()
            threading.Event().wait(REFRESH_S)  # slot maps are reloaded at most once per REFRESH_S
            tier.nodes.refresh()
            outs = [torch.zeros(spec.bytes_per_block, dtype=torch.uint8) for _ in keys]
            assert all(tier.get_many(keys, outs))
            assert all(torch.equal(o, b) for o, b in zip(outs, blocks))
        finally:
            tier.close()
