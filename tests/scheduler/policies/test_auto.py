"""`auto`: follows the candidate its shadow caches score best, lets a prompt's partial tail go first,
and takes retention hints. Every test runs twice: on the C core (where built) and on the Python code."""

from __future__ import annotations

import random

import pytest

from kvtier.scheduler.policies import AutoPolicy, RetentionHint, make_policy, native
from kvtier.scheduler.policies.auto import CANDIDATES, stable_hash
from kvtier.tiers.errors import ConfigError


@pytest.fixture(autouse=True, params=["c", "python"])
def core(request):
    """Runs the test with the C core enabled ("c"; skipped where it is not built) or disabled."""
    if request.param == "c" and not native.built():
        pytest.skip("the C policy core is not built here")
    previous = native.set_enabled(request.param == "c")
    yield request.param
    native.set_enabled(previous)


def scan_trace(seed: int, num_requests: int = 3000) -> list[tuple[int, ...]]:
    """A hot set of 12 two-block prompts asked again and again, between one-off 6-block scans: recency
    alone (LRU) lets the scans flush the hot set; frequency (ARC, S3-FIFO) keeps it."""
    rng = random.Random(seed)
    fresh = iter(range(10_000, 10**9))
    out = []
    for _ in range(num_requests):
        if rng.random() < 0.5:
            hot = rng.randrange(12)
            out.append((hot * 2, hot * 2 + 1))
        else:
            out.append(tuple(next(fresh) for _ in range(6)))
    return out


def hits(policy, requests) -> int:
    return sum(policy.replay_request(keys) for keys in requests)


def test_auto_follows_the_better_candidate():
    requests = scan_trace(0)
    scores = {name: hits(make_policy(name, 24), requests) for name in ("lru", "arc", "s3fifo")}
    assert scores["lru"] < max(scores.values())  # the trace separates the candidates
    auto = AutoPolicy(24)
    got = hits(auto, requests)
    assert auto.leader_name != "lru"
    assert got >= 0.95 * max(scores.values()) and got > scores["lru"]


def test_auto_alone_is_its_candidate_suffix_first():
    # one candidate: auto replays it (suffix first, the partial last block first out), never worse here
    requests = scan_trace(1, 1000)
    assert hits(AutoPolicy(24, candidates=["s3fifo"]), requests) >= hits(make_policy("s3fifo", 24), requests) * 0.95


def test_partial_last_block_goes_first():
    auto = AutoPolicy(4, candidates=["lru"])
    auto.replay_request((1, 2, 3), partial_last=True)  # 3 is the partial block the next turn rewrites
    auto.replay_request((7,))
    # full: the next insertion takes 3 (released), not 1 (the least recently used)
    assert auto.victim() == 3
    auto.replay_request((8,))
    assert 3 not in auto and {1, 2, 7, 8} == set(auto.keys())


def test_hint_releases_only_the_ending_sessions_own_blocks():
    auto = AutoPolicy(8, candidates=["lru"])
    system = (1, 2)
    auto.replay_request(system + (10, 11), RetentionHint("a"))
    auto.replay_request(system + (20, 21), RetentionHint("b"))  # 1, 2 now shared
    auto.replay_request(system + (10, 11, 12), RetentionHint("a", continues=False))
    # a ends: its own blocks 10, 11, 12 go first (least recent first), the shared system prompt stays
    assert [auto.evict() for _ in range(3)] == [12, 11, 10]
    assert {1, 2, 20, 21} <= set(auto.keys())


def test_a_removed_block_forgets_its_session():
    auto = AutoPolicy(8, candidates=["lru"])
    auto.replay_request((1,), RetentionHint("a"))
    auto.remove(1)
    auto.replay_request((1, 2), RetentionHint("b"))  # 1 is back: b's own, not shared with a
    auto.replay_request((5,))
    auto.replay_request((1, 2), RetentionHint("b", continues=False))
    assert [auto.evict() for _ in range(2)] == [2, 1]


def test_negative_priority_releases_too():
    auto = AutoPolicy(4, candidates=["lru"])
    auto.replay_request((1, 2), RetentionHint("x", priority=-1))
    auto.replay_request((5, 6))
    assert auto.victim() in (1, 2)
    assert RetentionHint(priority=-1).releases and not RetentionHint("s", True, 3).releases


def test_hint_from_params():
    assert RetentionHint.from_params(None) is None
    assert RetentionHint.from_params({"other": 1}) is None
    assert RetentionHint.from_params({"session": 7, "continues": False}) == RetentionHint("7", False, 0)
    with pytest.raises(ConfigError, match="continues: 'no'; expected true or false"):
        RetentionHint.from_params({"continues": "no"})
    with pytest.raises(ConfigError, match="priority: 1.5; expected an int"):
        RetentionHint.from_params({"priority": 1.5})
    with pytest.raises(ConfigError, match="session"):
        RetentionHint.from_params({"session": ["a"]})


def test_bad_arguments():
    with pytest.raises(ConfigError, match="candidates: \\['mru'\\]"):
        AutoPolicy(8, candidates=["mru"])
    with pytest.raises(ConfigError, match="min_shadow: 0"):
        AutoPolicy(8, min_shadow=0)
    with pytest.raises(ConfigError, match="half_life: -1"):
        AutoPolicy(8, half_life=-1)


def test_stable_hash_and_sampling_rate():
    assert stable_hash(12345) == stable_hash(12345) and stable_hash(b"k" * 16) == stable_hash(b"k" * 16)
    assert stable_hash(1) != stable_hash(2)
    assert AutoPolicy(100).sampling_rate == 1.0
    assert AutoPolicy(100_000).sampling_rate == pytest.approx(1 / 64, rel=0.05)
    assert set(CANDIDATES) >= {"lru", "arc", "s3fifo"}
