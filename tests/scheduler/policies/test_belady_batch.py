"""BeladyPolicy's batched request step: the cases the per-request batch must get exactly right
(a request that alone fills the cache, the order of keys never used again, the generic calls
mixed into a replay)."""

from __future__ import annotations

import random

from kvtier.scheduler.policies import BeladyPolicy, MinPolicy


def replay(policy, requests):
    return [policy.replay_request(keys) for keys in requests]


def test_request_alone_fills_the_cache():
    requests = [(1, 2, 3), (1,), (3,)]
    policy = BeladyPolicy(2, requests)
    # r0: room for 1 and 2 only, 3 stays out; r1: 1 hits (now never used again, like 2);
    # r2: 3 misses and evicts 2, the least recently used of the keys never used again
    assert replay(policy, requests) == [0, 1, 0]
    assert set(policy.keys()) == {1, 3} and len(policy) == 2


def test_cached_keys_rank_before_new_ones_and_repeats_at_their_last_position():
    requests = [(1, 2), (2, 1, 2, 5), (6,), (7,)]
    policy = BeladyPolicy(3, requests)
    # r1: 2, 1, 2 hit (3 leading ids) and are never used again: 1 (last seen at position 1)
    # ranks before 2 (position 2), then the new 5; r2 evicts 1, r3 evicts 2
    assert replay(policy, requests[:3]) == [0, 3, 0]
    assert set(policy.keys()) == {2, 5, 6}
    policy.replay_request(requests[3])
    assert set(policy.keys()) == {5, 6, 7}


def test_generic_calls_mixed_into_a_replay_keep_the_books():
    rng = random.Random(7)
    requests = [tuple(rng.randrange(30) for _ in range(rng.randrange(1, 6))) for _ in range(200)]
    for policy in (BeladyPolicy(5, requests), MinPolicy(5, requests)):
        for i, keys in enumerate(requests):
            policy.replay_request(keys)
            assert len(policy) == len(set(policy.keys())) <= 5
            if i % 7 == 3 and len(policy):
                victim = policy.victim()
                policy.remove(victim)
                assert victim not in policy
            if i % 11 == 5 and len(policy):
                key = next(iter(policy.keys()))
                policy.access(key)
                assert key in policy
