"""Hit-only replay: the docs/design.md semantics on small traces with hand-computed answers, and the
shared-trace anchors."""

from __future__ import annotations


import pytest

from kvtier.scheduler.replay.hitonly import HitOnlyWorkload, infinite_ratio, run_policy, sweep
from kvtier.scheduler.replay.traces import MOONCAKE_TRACE, Request, read_trace
from kvtier.tiers.errors import ConfigError



def req(ids, tokens=None):
    return Request(0, 0.0, tokens or 512 * len(ids), 1, tuple(ids))


# Hand-worked, capacity 3, LRU (each id refreshed or inserted in prompt order):
#   r0 [0,1,2]    hits 0            cache (old->new) 0 1 2
#   r1 [0,1,3]    hits 2 (0,1)      0,1 refresh -> 2 0 1; 3 evicts 2 -> 0 1 3
#   r2 [0,2]      hits 1 (0)        0 refresh -> 1 3 0; 2 evicts 1 -> 3 0 2
#   r3 [0,1,3]    hits 1 (0; 1 miss stops, though 3 is cached)   -> 0 refresh, 1 evicts 3, 3 evicts 2
# blocks: hits 4 of 11; infinite: r1 2, r2 2, r3 3 -> 7 of 11
SMALL = [req([0, 1, 2]), req([0, 1, 3]), req([0, 2]), req([0, 1, 3])]


def test_lru_hand_computed():
    work = HitOnlyWorkload.from_requests(SMALL)
    result = run_policy(work, "lru", 3)
    assert (result.hits, result.total) == (4, 11)
    assert result.block_hit_ratio == pytest.approx(4 / 11)
    assert infinite_ratio(work) == pytest.approx(7 / 11)


def test_token_weights_and_warmup():
    reqs = [req([0, 1, 2], tokens=1100), req([0, 1, 3], tokens=1030), req([0, 2], tokens=600),
            req([0, 1, 3], tokens=1200)]
    # tokens: r1 hits 0,1 = 1024 of 1030; r2 hits 0 = 512 of 600; r3 hits 0 = 512 of 1200 (last block 176)
    work = HitOnlyWorkload.from_requests(reqs, "tokens")
    assert run_policy(work, "lru", 3).hits == 1024 + 512 + 512
    assert work.total == 1100 + 1030 + 600 + 1200
    # warm-up 0.5: the first 2 requests only fill; measured: r2 and r3
    warm = HitOnlyWorkload.from_requests(reqs, "tokens", warmup_fraction=0.5)
    assert warm.start == 2 and warm.total == 600 + 1200
    assert run_policy(warm, "lru", 3).block_hit_ratio == pytest.approx(1024 / 1800)
    blocks = HitOnlyWorkload.from_requests(SMALL, warmup_fraction=0.5)
    assert run_policy(blocks, "lru", 3).block_hit_ratio == pytest.approx(2 / 5)


def test_bad_workload_arguments():
    with pytest.raises(ConfigError, match="warmup_fraction: 1.0"):
        HitOnlyWorkload.from_requests(SMALL, warmup_fraction=1.0)
    with pytest.raises(ConfigError, match="weight: 'bytes'"):
        HitOnlyWorkload.from_requests(SMALL, "bytes")
    with pytest.raises(ConfigError, match="cache_blocks: 0"):
        sweep(HitOnlyWorkload.from_requests(SMALL), [0], ["lru"])
    with pytest.raises(ConfigError, match="bounds: 'lru'"):
        sweep(HitOnlyWorkload.from_requests(SMALL), [2], ["lru"], bounds=["lru"])


def test_sweep_bounds_and_monotone_lru():
    reqs = [req([0] + [100 * (i % 7) + j for j in range(1, 2 + i % 5)]) for i in range(200)]
    work = HitOnlyWorkload.from_requests(reqs)
    result = sweep(work, [4, 8, 16, 64], ["lru", "arc", "suffix-arc"], bounds=["belady", "min"])
    lru = [r.block_hit_ratio for r in result.results if r.policy == "lru"]
    assert lru == sorted(lru)  # a bigger LRU cache never has a lower hit ratio
    for r in result.results:
        assert r.block_hit_ratio <= result.infinite + 1e-12
    assert result.belady[64] == pytest.approx(result.infinite)


def test_forked_sweep_matches_serial():
    reqs = [req([0] + [100 * (i % 5) + j for j in range(1, 2 + i % 4)]) for i in range(120)]
    work = HitOnlyWorkload.from_requests(reqs)
    serial = sweep(work, [3, 9], ["lru", "s3fifo"], jobs=1)
    forked = sweep(work, [3, 9], ["lru", "s3fifo"], jobs=2)
    key = lambda s: sorted((r.policy, r.cache_blocks, r.hits) for r in s.results)
    assert key(serial) == key(forked) and serial.belady == forked.belady


def test_shared_trace_anchors():
    """docs/design.md's anchors: infinite, LRU and Belady on the shared trace (each within 0.0005)."""
    work = HitOnlyWorkload.from_requests(read_trace(MOONCAKE_TRACE).requests)
    assert infinite_ratio(work) == pytest.approx(0.3664, abs=5e-4)
    for capacity, lru in ((2000, 0.0537), (6000, 0.1386), (20000, 0.2875)):
        assert run_policy(work, "lru", capacity).block_hit_ratio == pytest.approx(lru, abs=5e-4)
    assert run_policy(work, "belady", 2000).block_hit_ratio == pytest.approx(0.2467, abs=5e-4)


@pytest.mark.slow
def test_shared_trace_reference_policies_and_ours():
    """ARC and S3-FIFO reproduce docs/design.md's reference figures; suffix-arc beats the best of them."""
    work = HitOnlyWorkload.from_requests(read_trace(MOONCAKE_TRACE).requests)
    reference = {"arc": (0.0713, 0.1539, 0.2892), "s3fifo": (0.0766, 0.1529, 0.2529)}
    for policy, figures in reference.items():
        for capacity, want in zip((2000, 6000, 20000), figures):
            assert run_policy(work, policy, capacity).block_hit_ratio == pytest.approx(want, abs=5e-4), policy
    best = (0.0766, 0.1539, 0.2892)
    for capacity, bar in zip((2000, 6000, 20000), best):
        assert run_policy(work, "suffix-arc", capacity).block_hit_ratio > bar
