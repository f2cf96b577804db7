"""Eviction policies: registry, hand-worked sequences, and seeded random operations against a model."""

from __future__ import annotations

import random

import pytest

from kvtier.scheduler.policies import (
    NEVER, ONLINE, POLICIES, ARCPolicy, BeladyBypassPolicy, BeladyPolicy, CostAwarePolicy, FIFOPolicy, LRUPolicy,
    MinPolicy, PolicyName, PrefixAwarePolicy, S3FIFOPolicy, SuffixARCPolicy, make_policy, next_uses,
    parse_policy_names)
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.keys import trace_key


def replay(policy, requests):
    return [policy.replay_request(tuple(r)) for r in requests]


# --- registry ---------------------------------------------------------------------------------

def test_registry_covers_every_name():
    assert set(POLICIES) == set(PolicyName)
    for name in ONLINE:
        policy = make_policy(name.value, 4)
        assert policy.name == name.value and len(policy) == 0
    assert PolicyName.BELADY not in ONLINE and PolicyName.MIN not in ONLINE


def test_parse_policy_names_and_aliases():
    assert parse_policy_names("lru, ARC,s3-fifo,lru") == [PolicyName.LRU, PolicyName.ARC, PolicyName.S3FIFO]
    assert parse_policy_names(["optimal", "ours"]) == [PolicyName.OPT, PolicyName.SUFFIX_ARC]
    assert parse_policy_names("belady-bypass,opt,belady") == [PolicyName.OPT, PolicyName.BELADY]
    with pytest.raises(ConfigError, match="policy: 'lfu'; expected one of fifo, lru"):
        parse_policy_names("lru,lfu")
    with pytest.raises(ConfigError, match="at least one"):
        parse_policy_names(" , ")


def test_bad_capacity_and_offline_without_future():
    with pytest.raises(ConfigError, match="capacity: 0; expected an int >= 1"):
        LRUPolicy(0)
    with pytest.raises(ConfigError, match="capacity: 2.5"):
        make_policy("arc", 2.5)
    with pytest.raises(ConfigError, match="reads the future"):
        make_policy("belady", 4)
    with pytest.raises(ConfigError, match="history"):
        SuffixARCPolicy(4, history=0)


# --- hand-worked sequences --------------------------------------------------------------------

def test_fifo_and_lru_hand_worked():
    fifo, lru = FIFOPolicy(2), LRUPolicy(2)
    for p in (fifo, lru):
        p.insert("a")
        p.insert("b")
        p.access("a")  # LRU: b is now the oldest; FIFO: still a
    assert fifo.victim() == "a" and lru.victim() == "b"
    assert lru.victim(protected={"b"}) == "a"
    assert lru.victim(protected=lambda k: True) is None
    # hit-only step: [a, c] -> a hits; c evicts the oldest (b)
    assert lru.replay_request(("a", "c")) == 1
    assert set(lru.keys()) == {"a", "c"}


def test_arc_hand_worked():
    arc = ARCPolicy(2)
    arc.insert("a")
    arc.insert("b")  # T1 = [a, b]
    arc.access("a")  # T1 = [b], T2 = [a]
    assert arc.evict(incoming="c") == "b"  # |T1| = 1 > p = 0: T1's oldest, remembered in B1
    arc.insert("c")  # T1 = [c], B1 = [b]
    # b is a B1 ghost: p would grow to 1, so |T1| = 1 is not > p: T2's oldest (a) goes to B2
    assert arc.evict(incoming="b") == "a"
    arc.insert("b")  # ghost hit: p = 1, b enters T2
    assert arc.p == 1 and set(arc.keys()) == {"b", "c"}
    # a is a B2 ghost: p would shrink to 0, so T1's c goes
    assert arc.evict(incoming="a") == "c"
    arc.insert("a")
    assert arc.p == 0 and set(arc.keys()) == {"a", "b"}
    assert arc.victim(protected={"a", "b"}) is None


def test_s3fifo_hand_worked():
    s3 = S3FIFOPolicy(4, small_fraction=0.5)  # small queue target 2, ghost 2
    for k in "abcd":
        s3.insert(k)  # S = [a, b, c, d]
    s3.access("a")
    s3.access("a")  # a: freq 2 (hit twice while in S)
    # S is at/over its target: a (freq > 1) moves to M; b (freq 0) is the victim and goes to the ghost
    assert s3.evict() == "b"
    s3.insert("e")  # S = [c, d, e], M = [a]
    assert s3.evict() == "c"
    s3.insert("b")  # b is remembered by the ghost: straight into M
    assert set(s3.keys()) == {"a", "b", "d", "e"}
    s3.remove("d")
    s3.remove("e")  # S is empty now: eviction comes from M, CLOCK-like
    s3.insert("f")  # S = [f] (below target, but M is not empty)
    s3.insert("g")  # S = [f, g]: at target again
    s3.access("f")
    s3.access("f")
    # f (freq 2) moves to M = [a, b, f]; S = [g] is now below target, so M evicts, CLOCK-like:
    # a (freq 2, kept from S) decays to 1 and goes round; b (freq 0) is the victim
    assert s3.evict() == "b"
    # M = [f, a]: f and a decay in turn (g in S is protected and below target anyway)
    assert s3.evict(protected={"g"}) == "a"


def test_belady_hand_worked():
    requests = [(1, 2), (3,), (1,), (2,)]
    # at request 1, key 1 is next used at request 2 and key 2 at request 3: Belady evicts 2
    assert next_uses(requests) == [(2, 3), (NEVER,), (NEVER,), (NEVER,)]
    assert replay(BeladyPolicy(2, requests), requests) == [0, 0, 1, 0]
    assert replay(LRUPolicy(2), requests) == [0, 0, 0, 0]


def test_belady_protects_the_request_but_min_does_not():
    requests = [(1,), (2, 3), (1,)]
    # Belady may not evict 2 (same request) to make room for 3, so 1 goes; classic MIN evicts 2
    assert replay(BeladyPolicy(2, requests), requests) == [0, 0, 0]
    assert replay(MinPolicy(2, requests), requests) == [0, 0, 1]
    assert next_uses(requests, "event") == [(3,), (NEVER, NEVER), (NEVER,)]
    with pytest.raises(ConfigError, match="granularity"):
        next_uses(requests, "token")
    with pytest.raises(ConfigError, match="does not match"):
        BeladyPolicy(2, requests).replay_request((1, 2))


def test_belady_bypass_declines_to_admit():
    requests = [(1,), (2,), (1,)]
    # 2 is never needed again, 1 is: a cache that may refuse keeps 1; forced insertion loses it
    assert replay(BeladyBypassPolicy(1, requests), requests) == [0, 0, 1]
    assert replay(BeladyPolicy(1, requests), requests) == [0, 0, 0]


def test_prefix_aware_evicts_leaves_only():
    p = PrefixAwarePolicy(4)
    p.insert("a")
    p.insert("b", parent="a")
    p.insert("c", parent="b")
    p.insert("d")
    p.access("a")  # a is the most recent, but it has a cached child: never a victim before b and c
    assert p.depth("c") == 2
    assert p.evict() == "c"  # leaves: c (older), d
    assert p.evict() == "b"  # b became a leaf when c left, and it is older than d
    assert p.evict() == "d"  # a was accessed last
    assert p.evict() == "a"
    assert p.victim() is None


def test_cost_aware_keeps_the_dearest_blocks():
    p = CostAwarePolicy(3, value=lambda key, depth: 10.0 * (depth + 1))
    p.insert("a")
    p.insert("b", parent="a")  # depth 1: worth 20
    p.insert("x")  # depth 0: worth 10
    assert p.evict() == "x"  # cheapest leaf
    assert p.inflation == 10.0
    p.insert("y")  # worth 10 + 10 = 20, ties with b: the older entry (b) goes first
    assert p.evict() == "b"
    assert p.evict(protected={"y"}) == "a"


def test_suffix_arc_remembers_deep_history():
    history = 4
    p = SuffixARCPolicy(2, history=history)
    p.insert("a")
    p.insert("b", parent="a")
    for k in "cdefg":  # push a and b far out: plain ARC would have forgotten them
        p.evict()
        p.insert(k)
    p.evict()
    p.insert("a")  # a ghost hit: straight to T2 (frequent)
    assert "a" in p and p.p > 0


# --- seeded random operations against a plain model ---------------------------------------------

@pytest.mark.parametrize("name", [n for n in ONLINE])
def test_random_operations_against_model(name):
    rng = random.Random(f"policy-{name.value}")
    capacity = 8
    policy = make_policy(name, capacity)
    model: dict = {}  # key -> parent (the reference: a plain dict)
    for step in range(3000):
        op = rng.random()
        keys = list(model)
        if op < 0.35 and keys:
            key = rng.choice(keys)
            policy.access(key)
        elif op < 0.9:
            key = trace_key(rng.randrange(40)) if name is PolicyName.LRU else rng.randrange(40)
            if key in model:
                continue
            if len(model) >= capacity:
                pinned = set(rng.sample(keys, rng.randrange(len(keys) + 1)))
                victim = policy.victim(pinned if rng.random() < 0.5 else pinned.__contains__)
                if victim is None:
                    assert pinned == set(keys) or policy.uses_parent, f"step {step}: no victim but some unpinned"
                    continue
                assert victim in model and victim not in pinned, f"step {step}: bad victim {victim!r}"
                if policy.uses_parent and name is not PolicyName.SUFFIX_ARC:
                    children = [k for k, p in model.items() if p == victim]
                    assert not children, f"step {step}: evicted {victim!r} with cached children {children}"
                policy.remove(victim)
                for k, p in model.items():
                    if p == victim:
                        model[k] = None
                del model[victim]
            keys = list(model)
            parent = rng.choice(keys) if keys and rng.random() < 0.6 else None
            policy.insert(key, parent)
            model[key] = parent
        elif keys:
            key = rng.choice(keys)
            policy.remove(key)
            for k, p in model.items():
                if p == key:
                    model[k] = None
            del model[key]
        assert len(policy) == len(model) <= capacity
        assert set(policy.keys()) == set(model), f"step {step}"
        assert all(k in policy for k in model)


@pytest.mark.parametrize("name", list(PolicyName))
def test_replay_request_keeps_capacity(name):
    rng = random.Random(f"replay-{name.value}")
    requests = []
    for _ in range(300):
        conv = rng.randrange(30)
        requests.append(tuple([0] + [conv * 100 + i for i in range(1, rng.randrange(2, 12))]))
    kwargs = {"requests": requests} if name.offline else {}
    policy = make_policy(name, 16, **kwargs)
    seen: set = set()
    for keys in requests:
        hits = policy.replay_request(keys)
        expected_max = 0
        while expected_max < len(keys) and keys[expected_max] in seen:
            expected_max += 1
        assert 0 <= hits <= expected_max  # never more than the infinite cache
        assert len(policy) <= 16
        seen.update(keys)


def reference_belady(capacity, requests):
    """Request-level Belady written plainly (O(n) per eviction): the model BeladyPolicy must match."""
    future = next_uses(requests)
    cache: dict = {}  # key -> (next use, stamp)
    clock, out = 0, []
    for keys, nexts in zip(requests, future):
        hits = 0
        while hits < len(keys) and keys[hits] in cache:
            hits += 1
        out.append(hits)
        for key, nxt in zip(keys, nexts):  # present keys are refreshed first: all are protected
            if key in cache:
                clock += 1
                cache[key] = (nxt, clock)
        for key, nxt in zip(keys, nexts):
            if key in cache:
                continue
            if len(cache) >= capacity:
                candidates = [k for k in cache if k not in keys]
                if not candidates:
                    break
                victim = max(candidates, key=lambda k: (cache[k][0], -cache[k][1]))
                del cache[victim]
            clock += 1
            cache[key] = (nxt, clock)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_belady_matches_plain_reference(seed):
    rng = random.Random(seed)
    requests = []
    for _ in range(250):
        shape = rng.random()
        if shape < 0.7:  # a conversation prefix: leading shared ids, then new ones
            conv = rng.randrange(12)
            requests.append(tuple([0] + [conv * 50 + i for i in range(1, rng.randrange(2, 9))]))
        else:  # anything: repeats after misses, duplicates within a request
            requests.append(tuple(rng.randrange(60) for _ in range(rng.randrange(1, 7))))
    for capacity in (3, 7, 20):
        assert replay(BeladyPolicy(capacity, requests), requests) == reference_belady(capacity, requests)
