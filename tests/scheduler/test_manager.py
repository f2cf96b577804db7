"""OffloadManager end to end on real tiers: store, lookup, plan, load, eviction cascade, prefetch,
restart, corruption, concurrency, and the commands' pickling."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.manager import OffloadManager
from kvtier.tiers.commands import Completion, Evict, Load, Move, MoveReason, Save
from kvtier.tiers.errors import ClosedError, ConfigError
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName
from kvtier.tiers.kvbuffer import BlockKVBuffer
from managerutil import MODEL, tiny_spec


@pytest.fixture
def spec() -> KVSpec:
    return tiny_spec()


def blocks_config(spec, *, gpu=0, host=8, disk=0, tmp_path=None, **kw) -> OffloadConfig:
    b = spec.bytes_per_block
    return OffloadConfig(gpu_bytes=gpu * b, host_bytes=host * b, disk_bytes=disk * b,
                         disk_path=str(tmp_path / "store") if disk else None, **kw)


def engine_with_kv(spec, num_blocks: int, seed: int) -> BlockKVBuffer:
    buf = BlockKVBuffer(spec, num_blocks)
    buf.data.copy_(torch.randn(buf.data.shape, generator=torch.Generator().manual_seed(seed)))
    return buf


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, n).astype(np.int32)


def restore_all(manager, rid, prompt, num_blocks) -> tuple[BlockKVBuffer, int]:
    """Plans, then restores every cached block of `prompt` (as the planner decides) into a fresh buffer."""
    manager.enqueue(rid, prompt)
    plan = manager.plan(rid)
    dst = BlockKVBuffer(manager.spec, num_blocks)
    loading = manager.load(rid, dst, plan)
    arrived = loading.wait()
    manager.finish(rid)
    return dst, loading.restore_start + arrived if loading.num_restored_blocks else 0


def force_restore(manager, rid, prompt, num_blocks):
    """Restores every matched block (a plan with split 0, restore_stop = k)."""
    manager.enqueue(rid, prompt)
    plan = manager.plan(rid)
    from dataclasses import replace

    plan = replace(plan, split=0, restore_stop=plan.num_found_blocks)
    dst = BlockKVBuffer(manager.spec, num_blocks)
    loading = manager.load(rid, dst, plan)
    good = loading.wait()
    manager.finish(rid)
    return dst, good


def test_store_then_restore_is_byte_exact(spec):
    with OffloadManager(spec, blocks_config(spec, host=8, prefetch=False), model_config=MODEL) as m:
        prompt = tokens(4 * 16 + 5)
        src = engine_with_kv(spec, 5, seed=1)
        m.store("a", prompt, src).wait(10)
        assert m.lookup(prompt) == 64
        dst, good = force_restore(m, "b", prompt, 5)
        assert good == 4
        assert torch.equal(dst.data[:4], src.data[:4])


def test_lookup_stops_at_first_miss_and_divergence(spec):
    with OffloadManager(spec, blocks_config(spec, host=8, prefetch=False), model_config=MODEL) as m:
        prompt = tokens(64)
        m.store("a", prompt, engine_with_kv(spec, 4, 0)).wait(10)
        diverged = prompt.copy()
        diverged[40] += 1  # inside block 2
        assert m.lookup(diverged) == 32
        assert m.lookup(tokens(64, seed=9)) == 0


def test_lru_eviction_keeps_capacity_and_pinned_blocks(spec):
    with OffloadManager(spec, blocks_config(spec, host=4, prefetch=False, policy="lru"), model_config=MODEL) as m:
        first = tokens(64, 1)
        src = engine_with_kv(spec, 4, 1)
        m.store("a", first, src).wait(10)
        # pin `first` by starting a load and holding it: its blocks must survive the next saves
        m.enqueue("reader", first)
        from dataclasses import replace

        plan = replace(m.plan("reader"), split=0, restore_stop=4)
        dst = BlockKVBuffer(spec, 4)
        with m.decider.lock:  # the load and the store below are decided before the load's completion
            loading = m.load("reader", dst, plan)
            m.store("b", tokens(64, 2), engine_with_kv(spec, 4, 2))
        loading.wait()
        assert torch.equal(dst.data, src.data)
        m.flush()
        assert m.stats()["blocks_by_tier"]["host"] <= 4


def test_eviction_cascade_write_back_keeps_bytes(spec, tmp_path):
    config = blocks_config(spec, gpu=2, host=2, disk=16, tmp_path=tmp_path, prefetch=False, write_mode="write-back")
    with OffloadManager(spec, config, model_config=MODEL) as m:
        prompts = [tokens(32, s) for s in range(4)]
        sources = [engine_with_kv(spec, 2, s) for s in range(4)]
        for i, (p, s) in enumerate(zip(prompts, sources)):
            m.store(f"r{i}", p, s).wait(10)
        m.flush()
        st = m.stats()
        assert st["demoted_blocks"] >= 4 and st["blocks_by_tier"]["gpu"] <= 2 and st["blocks_by_tier"]["host"] <= 2
        for i, (p, s) in enumerate(zip(prompts, sources)):
            dst, good = force_restore(m, f"q{i}", p, 2)
            assert good == 2, f"prompt {i}"
            assert torch.equal(dst.data, s.data), f"prompt {i}"


def test_write_through_survives_restart(spec, tmp_path):
    config = blocks_config(spec, host=4, disk=32, tmp_path=tmp_path, prefetch=False)
    prompt, src = tokens(48, 3), engine_with_kv(spec, 3, 3)
    with OffloadManager(spec, config, model_config=MODEL) as m:
        m.store("a", prompt, src).wait(10)
        m.flush()
        assert m.stats()["written_to_disk_blocks"] == 3
    with OffloadManager(spec, config, model_config=MODEL) as m2:
        assert m2.lookup(prompt) == 48
        dst, good = force_restore(m2, "b", prompt, 3)
        assert good == 3 and torch.equal(dst.data, src.data)
    other = spec.with_(weights_revision="random-1")  # the same store, another model: never served
    with OffloadManager(other, config, model_config=MODEL) as m3:
        assert m3.lookup(prompt) == 0


@pytest.mark.parametrize("codec", ["none", "zstd", "zstd-shuffle"])
def test_every_codec_restores_from_disk_through_the_manager(spec, tmp_path, codec):
    # store -> write-through to a disk store of this codec -> a new manager restores from disk, exact bytes
    config = blocks_config(spec, host=4, disk=32, tmp_path=tmp_path, prefetch=False, codec=codec)
    prompt, src = tokens(48, 7), engine_with_kv(spec, 3, 7)
    with OffloadManager(spec, config, model_config=MODEL) as m:
        m.store("a", prompt, src).wait(10)
        m.flush()
    with OffloadManager(spec, config, model_config=MODEL) as m2:
        assert m2.decider.planner.disk_path == ("disk" if codec == "none" else "disk_zstd")
        dst, good = force_restore(m2, "b", prompt, 3)
        assert good == 3 and torch.equal(dst.data, src.data)


def test_prefetch_promotes_queued_blocks_before_load(spec, tmp_path):
    config = blocks_config(spec, host=8, disk=32, tmp_path=tmp_path, prefetch=True)
    prompt, src = tokens(64, 4), engine_with_kv(spec, 4, 4)
    with OffloadManager(spec, config, model_config=MODEL) as m:
        m.store("a", prompt, src).wait(10)
        m.flush()
    with OffloadManager(spec, config, model_config=MODEL) as m2:  # restart: everything on disk only
        assert m2.stats()["blocks_by_tier"] == {"host": 0, "disk": 4}
        # "b" is the head of the queue with nothing running: it is about to run, nothing is promoted
        m2.enqueue("b", prompt)
        m2.flush()
        assert m2.stats()["blocks_by_tier"]["host"] == 0
        # an uncached 16k-token prompt is queued ahead of it (predicted prefill ~0.7 s): "b" now waits behind
        # it, and its disk blocks (0.3 ms of predicted disk time) can land before it starts: the 3 its plan
        # restores (the last block holds the prompt's last token, always computed)
        m2.cancel("b")
        m2.enqueue("x", tokens(16384, 9))
        m2.enqueue("b", prompt)
        landed = threading.Event()
        for _ in range(200):
            m2.flush()
            if m2.stats()["blocks_by_tier"]["host"] == 3:
                landed.set()
                break
            landed.wait(0.01)
        assert landed.is_set()
        st = m2.stats()
        assert st["prefetched_blocks"] == 3 and st["prefetch_moves"] == 1  # one batched move
        m2.cancel("x")
        dst, good = force_restore(m2, "b", prompt, 4)
        assert good == 4 and torch.equal(dst.data, src.data)
        st = m2.stats()
        assert st["prefetch_used_blocks"] == 3 and st["double_reads"] == 0
        assert st["prefetch_coverage"] == 0.75  # 3 of the 4 restored blocks were in host when the load began


def test_cancel_releases_protection(spec, tmp_path):
    config = blocks_config(spec, host=8, disk=32, tmp_path=tmp_path, prefetch=True)
    with OffloadManager(spec, config, model_config=MODEL) as m:
        prompt = tokens(32, 5)
        m.store("a", prompt, engine_with_kv(spec, 2, 5)).wait(10)
        m.enqueue("b", prompt)
        m.decider.next_prefetch()  # the prefetcher's round, run here so the test need not wait for it
        keys = m.keys(prompt)
        assert all(m.decider.index.is_protected(k) for k in keys)
        m.cancel("b")
        m.flush()
        assert not any(m.decider.index.is_protected(k) for k in keys)


def test_corrupt_disk_block_is_a_failed_load_and_forgotten(spec, tmp_path):
    import lmdb

    config = blocks_config(spec, host=4, disk=32, tmp_path=tmp_path, prefetch=False)
    prompt, src = tokens(48, 6), engine_with_kv(spec, 3, 6)
    with OffloadManager(spec, config, model_config=MODEL) as m:
        m.store("a", prompt, src).wait(10)
        m.flush()
    # flip one payload byte of the second block's value in place
    from kvtier.tiers.disk.env import BLOCKS_DB

    env = lmdb.open(str(tmp_path / "store"), max_dbs=8)
    flipped = 0
    for name in (BLOCKS_DB,):
        try:
            db = env.open_db(name, create=False)
        except lmdb.Error:
            continue
        with env.begin(write=True, db=db) as txn:
            items = list(txn.cursor())
            k, v = items[1]
            v = bytearray(v)
            v[-1] ^= 0xFF
            txn.put(k, bytes(v))
            flipped += 1
    env.close()
    assert flipped == 1
    with OffloadManager(spec, config, model_config=MODEL) as m2:
        dst, good = force_restore(m2, "b", prompt, 3)
        assert good < 3
        assert torch.equal(dst.data[:good], src.data[:good])
        assert m2.lookup(prompt) < 48  # the corrupt block is forgotten: recomputed next time
        assert m2.stats()["failed_blocks"] >= 1


def test_concurrent_requests_no_deadlock(spec, tmp_path):
    config = blocks_config(spec, gpu=4, host=8, disk=64, tmp_path=tmp_path, prefetch=True)
    errors: list[BaseException] = []
    with OffloadManager(spec, config, model_config=MODEL) as m:
        prompts = [tokens(64, s) for s in range(6)]
        sources = [engine_with_kv(spec, 4, s) for s in range(6)]

        def client(i: int) -> None:
            try:
                for r in range(5):
                    p, s = prompts[(i + r) % 6], sources[(i + r) % 6]
                    rid = f"t{i}-{r}"
                    m.enqueue(rid, p)
                    dst, good = force_restore(m, rid + "x", p, 4)
                    assert torch.equal(dst.data[:good], s.data[:good])
                    m.store(rid, p, s).wait(10)
                    m.finish(rid)
            except BaseException as err:  # reported to the main thread
                errors.append(err)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors
        m.flush()
        st = m.stats()
        assert st["blocks_by_tier"]["gpu"] <= 4 and st["blocks_by_tier"]["host"] <= 8


def test_commands_pickle():
    commands = [Move("host", "disk", (b"k" * 16,), (1,), (), "r", MoveReason.WRITE_THROUGH),
                Load((b"k" * 16,), (TierName.HOST,), (1,), (0,), 4, "r"),
                Save((b"k" * 16,), (0,), TierName.HOST, (3,), "r"), Evict(TierName.DISK, (b"k" * 16,)),
                Completion(1, "r", (b"k" * 16,), ())]
    for c in commands:
        assert pickle.loads(pickle.dumps(c)) == c


def test_config_errors(spec, tmp_path):
    with pytest.raises(ConfigError, match="disk_path"):
        OffloadConfig(disk_bytes="1GiB")
    with pytest.raises(ConfigError, match="write_mode"):
        OffloadConfig(write_mode="sometimes")
    with pytest.raises(ConfigError, match="unknown key"):
        OffloadConfig.from_dict({"host_bytes": "1GiB", "hsot_bytes": 1})
    with pytest.raises(ConfigError, match="policy: .*'suffix-arcz'"):
        OffloadConfig(policy="suffix-arcz")  # checked where it enters, not when the manager starts
    with pytest.raises(ConfigError, match="policy: 'belady' reads the future"):
        OffloadConfig(policy="belady")
    toml = tmp_path / "kvtier.toml"
    toml.write_text('[kvtier]\nhost_bytes = "64MiB"\npolicy = "lru"\n')
    assert OffloadConfig.from_toml(toml).host_bytes == 64 << 20
    m = OffloadManager(spec, blocks_config(spec, host=2, prefetch=False), model_config=MODEL)
    m.close()
    with pytest.raises(ClosedError):
        m.enqueue("x", tokens(16))


def test_retention_hint_lets_an_ended_session_go_first(spec):
    from kvtier.scheduler.policies import RetentionHint

    def run(hinted: bool) -> tuple[int, int]:
        config = blocks_config(spec, host=8, prefetch=False, policy="auto")
        with OffloadManager(spec, config, model_config=MODEL) as m:
            older, newer = tokens(64, 1), tokens(64, 2)
            # session b stores first (least recent), then session a, whose conversation then ends
            for rid, prompt, hint in (("b1", older, RetentionHint("b")), ("a1", newer, RetentionHint("a"))):
                m.enqueue(rid, prompt, hint)
                m.store(rid, prompt, engine_with_kv(spec, 4, 1)).wait(10)
                m.finish(rid, RetentionHint("a", continues=False) if hinted and rid == "a1" else None)
            m.flush()
            # two new blocks: the cache (8 blocks, full) evicts two
            m.store("c1", tokens(32, 3), engine_with_kv(spec, 2, 3)).wait(10)
            m.flush()
            return m.lookup(older), m.lookup(newer)

    # no hint: the least recent (session b) loses its tail; hinted: the ended session a goes first
    older_plain, newer_plain = run(False)
    assert older_plain < 64 and newer_plain == 64
    older_hinted, newer_hinted = run(True)
    assert older_hinted == 64 and newer_hinted < 64
