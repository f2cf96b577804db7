"""`opt` is the exact offline optimum under the prefix rule: brute force agrees, no online policy beats it."""

from __future__ import annotations

import itertools
import random

import pytest

from kvtier.scheduler.policies import ONLINE, BeladyPolicy, PolicyName, make_policy


def random_prefix_trace(rng: random.Random, num_requests: int, max_keys: int) -> list[tuple[int, ...]]:
    """Requests that are root-to-node paths of a random prefix tree (chained keys: a key names its prefix)."""
    parent: dict[int, int | None] = {}
    requests = []
    for _ in range(num_requests):
        if parent and rng.random() < 0.75:
            node = rng.choice(list(parent))  # extend or repeat a known prefix
        else:
            node = None
        for _ in range(rng.randrange(0 if node is not None else 1, 3)):
            if len(parent) >= max_keys:
                break
            key = len(parent)
            parent[key] = node
            node = key
        if node is None:
            node = rng.choice(list(parent))
        path = []
        while node is not None:
            path.append(node)
            node = parent[node]
        requests.append(tuple(reversed(path)))
    return requests


def brute_force_opt(capacity: int, requests: list[tuple[int, ...]]) -> int:
    """The most prefix hits any cache of `capacity` keys can score: after each request the cache may
    keep any subset (of at most `capacity` keys) of what it held plus the request's keys."""
    best: dict[frozenset, int] = {frozenset(): 0}
    for keys in requests:
        nxt: dict[frozenset, int] = {}
        for held, score in best.items():
            hits = 0
            while hits < len(keys) and keys[hits] in held:
                hits += 1
            pool = sorted(held | set(keys))
            for size in range(min(capacity, len(pool)) + 1):
                for kept in itertools.combinations(pool, size):
                    state = frozenset(kept)
                    if nxt.get(state, -1) < score + hits:
                        nxt[state] = score + hits
        best = nxt
    return max(best.values())


def total_hits(policy, requests) -> int:
    return sum(policy.replay_request(keys) for keys in requests)


@pytest.mark.parametrize("seed", range(60))
def test_opt_equals_brute_force(seed):
    rng = random.Random(f"opt-{seed}")
    requests = random_prefix_trace(rng, rng.randrange(3, 8), 9)
    capacity = rng.randrange(1, 4)
    opt = make_policy("opt", capacity, requests=requests)
    assert total_hits(opt, requests) == brute_force_opt(capacity, requests), requests


def test_opt_bypasses_and_keeps_prefixes():
    # [1, 2] is needed again, [3] never: with one slot forced insertion loses 1, opt keeps it
    requests = [(1, 2), (3,), (1, 2)]
    assert total_hits(make_policy("opt", 2, requests=requests), requests) == 2
    assert total_hits(BeladyPolicy(2, requests), requests) == 0  # a reference, not a bound


@pytest.mark.parametrize("seed", range(40))
def test_no_online_policy_beats_opt(seed):
    rng = random.Random(f"bound-{seed}")
    requests = random_prefix_trace(rng, rng.randrange(20, 80), 60)
    for capacity in (1, 2, 3, 5, 8, 13):
        bound = total_hits(make_policy("opt", capacity, requests=requests), requests)
        for name in ONLINE:
            hits = total_hits(make_policy(name, capacity), requests)
            assert hits <= bound, f"{name.value} @ {capacity}: {hits} > opt {bound}"


def test_opt_is_the_only_bound():
    assert [n for n in PolicyName if n.is_bound] == [PolicyName.OPT]
    assert PolicyName.AUTO in ONLINE and PolicyName.OPT not in ONLINE
