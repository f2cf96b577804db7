"""The C policy core (`_fastpolicy`) against the Python classes: the same hits, victims and keys on random
operation sequences (hypothesis), for LRU, ARC, S3-FIFO and `auto` (books, released keys, hints, shadows)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.scheduler.policies import ARCPolicy, AutoPolicy, LRUPolicy, RetentionHint, S3FIFOPolicy, native
from kvtier.scheduler.policies.auto import _deep_s3fifo
from kvtier.tiers.errors import ConfigError

pytestmark = pytest.mark.skipif(not native.built(), reason="the C policy core is not built here")

@pytest.fixture(autouse=True)
def c_core():
    """The policies built in a test use the C core (whatever KVTIER_PURE_POLICIES says), but `pure()`'s."""
    previous = native.set_enabled(True)
    yield
    native.set_enabled(previous)


FACTORIES = {"lru": LRUPolicy, "arc": ARCPolicy, "s3fifo": S3FIFOPolicy, "s3fifo-deep": _deep_s3fifo}

#: one operation: (verb, key, extra); keys come from a small space so that hits, ghosts and returns happen
OPS = st.lists(st.tuples(st.sampled_from(["insert", "access", "victim", "evict", "remove", "request"]),
                         st.integers(0, 24), st.integers(0, 7)), max_size=300)


def pure(factory, *args, **kwargs):
    """A policy built with the C core disabled (the Python reference)."""
    previous = native.set_enabled(False)
    try:
        return factory(*args, **kwargs)
    finally:
        native.set_enabled(previous)


def request(key: int, length: int) -> tuple[int, ...]:
    """A prompt of `length + 1` chained-looking ids starting at `key` (overlapping prompts share heads)."""
    return tuple(range(key, key + length + 1))


def apply(policy, verb: str, key: int, extra: int):
    """One operation on a policy; the outcome (a value or the exception type) is what must agree."""
    protected = {k for k in range(extra, 25, 3)}
    try:
        if verb == "insert":
            if key in policy:
                return "cached"
            if len(policy) >= policy.capacity:
                return ("evicted", policy.evict(None, key))
            policy.insert(key)
            return None
        if verb == "access":
            return policy.access(key) if key in policy else "absent"
        if verb == "victim":
            return policy.victim(protected, key if extra % 2 else None)
        if verb == "evict":
            return policy.evict(protected.__contains__)
        if verb == "remove":
            return policy.remove(key) if key in policy else "absent"
        return policy.replay_request(request(key, extra))
    except KeyError as err:
        return ("KeyError", err.args[0] if err.args else None)


def same_state(a, b) -> None:
    assert len(a) == len(b) and set(a.keys()) == set(b.keys())
    assert a.lookup(list(range(30))) == b.lookup(list(range(30)))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("capacity", [1, 3, 8])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_single_policy_matches_python(name, capacity, ops):
    reference, fast = FACTORIES[name](capacity), native.NativePolicy(FACTORIES[name](capacity))
    for verb, key, extra in ops:
        assert apply(fast, verb, key, extra) == apply(reference, verb, key, extra), (verb, key, extra)
        same_state(fast, reference)
        if name == "arc":
            assert fast.p == reference.p


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_single_policy_matches_python_on_long_sequences(name, seed):
    # skewed keys: some are hit again and again (frequency and ghosts matter), most seldom
    rng = random.Random(seed)
    reference, fast = FACTORIES[name](16), native.NativePolicy(FACTORIES[name](16))
    for _ in range(5000):
        verb = rng.choice(["insert", "insert", "access", "access", "victim", "evict", "remove", "request"])
        key = min(int(rng.expovariate(0.08)), 24)
        extra = rng.randrange(8)
        assert apply(fast, verb, key, extra) == apply(reference, verb, key, extra)
        same_state(fast, reference)


@pytest.mark.parametrize("capacity", [2, 5, 12])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, partial=st.booleans())
def test_auto_matches_python(capacity, ops, partial):
    # min_shadow small: the shadows sample (SHARDS) and the leader changes, as on a large cache
    reference, fast = pure(AutoPolicy, capacity, min_shadow=1), AutoPolicy(capacity, min_shadow=1)
    for verb, key, extra in ops:
        if verb == "request":
            hint = RetentionHint(str(key % 3), continues=extra != 0) if extra % 2 else None
            keys = request(key, extra)
            assert (fast.replay_request(keys, hint, partial and extra > 2)
                    == reference.replay_request(keys, hint, partial and extra > 2))
        else:
            if verb == "access" and extra == 0:
                fast.observe(request(key, 3))
                reference.observe(request(key, 3))
            assert apply(fast, verb, key, extra) == apply(reference, verb, key, extra), (verb, key, extra)
        same_state(fast, reference)
        assert fast.leader_name == reference.leader_name


def test_auto_matches_python_on_a_long_random_trace():
    rng = random.Random(7)
    prompts = [request(rng.randrange(0, 400) * 8, rng.randrange(1, 12)) for _ in range(60)]
    reference, fast = pure(AutoPolicy, 40, min_shadow=8), AutoPolicy(40, min_shadow=8)
    for i in range(4000):
        keys = prompts[rng.randrange(len(prompts))] if rng.random() < 0.6 else request(10_000 + i * 20, rng.randrange(8))
        assert fast.replay_request(keys, partial_last=True) == reference.replay_request(keys, partial_last=True)
        assert fast.leader_name == reference.leader_name
    assert set(fast.keys()) == set(reference.keys())


def test_keys_of_any_hashable_type():
    # bytes keys (BlockKey) and other objects (sampled by their str) work, and sample as in Python
    keys = [bytes([i]) * 16 for i in range(50)] + [("t", i) for i in range(50)]
    reference, fast = pure(AutoPolicy, 16, min_shadow=2), AutoPolicy(16, min_shadow=2)
    rng = random.Random(3)
    for _ in range(500):
        start = rng.randrange(0, 95)
        req = tuple(keys[start:start + rng.randrange(1, 6)])
        assert fast.replay_request(req) == reference.replay_request(req)
        assert fast.leader_name == reference.leader_name


def test_auto_takes_the_policy_calls_as_documented():
    # the Policy API: insert(key, parent=None) by position or keyword, KeyError on a second insert
    auto = AutoPolicy(4)
    auto.insert(1)
    auto.insert(2, 1)
    auto.insert(3, parent=2)
    with pytest.raises(KeyError, match="already cached"):
        auto.insert(3)
    auto.access(2)
    with pytest.raises(KeyError):
        auto.access(9)
    assert len(auto) == 3 and auto.evict() in (1, 3)


def test_fallback_is_the_python_code():
    previous = native.set_enabled(False)
    try:
        assert not native.available()
        auto = AutoPolicy(8)
        auto.replay_request((1, 2, 3))
        assert 2 in auto and len(auto) == 3
    finally:
        native.set_enabled(previous)
    assert native.available() is previous


def test_lane_spec_rejects_other_policies():
    from kvtier.scheduler.policies import SuffixARCPolicy

    with pytest.raises(ConfigError, match="SuffixARCPolicy: the C core implements"):
        native.lane_spec(SuffixARCPolicy(4))
