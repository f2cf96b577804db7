"""Index.prefix_codes: the same walk as lookup + best_tier, checked against a plain dict model."""

from __future__ import annotations

import random

from kvtier.scheduler.index import DISK_SLOT, Index
from kvtier.tiers.tier import TierName

TIERS = (TierName.GPU, TierName.HOST, TierName.DISK)


def test_prefix_codes_match_a_dict_model_under_random_adds_and_drops() -> None:
    rng = random.Random(0)
    index = Index()
    model: dict[bytes, set[TierName]] = {}  # key -> tiers holding it
    keys = [i.to_bytes(16, "little") for i in range(64)]
    for step in range(3000):
        key, tier = rng.choice(keys), rng.choice(TIERS)
        if rng.random() < 0.6:
            index.add(key, tier, DISK_SLOT if tier is TierName.DISK else step)
            model.setdefault(key, set()).add(tier)
        else:
            index.drop(key, tier)
            model.get(key, set()).discard(tier)
        if step % 50 == 0:
            query = rng.sample(keys, 40)
            want = []
            for k in query:  # the prefix: up to the first key no tier holds
                if not model.get(k):
                    break
                want.append(min(t.rank for t in model[k]))
            assert index.prefix_codes(query).tolist() == want
            assert want == [e.best_tier.rank for e in index.lookup(query)]


def test_prefix_codes_of_nothing_cached_is_empty() -> None:
    index = Index()
    index.add(b"a" * 16, TierName.HOST, 3)
    # a miss first: the prefix is empty even though a later key is cached
    assert index.prefix_codes([b"z" * 16, b"a" * 16]).tolist() == []
    assert index.prefix_codes([b"a" * 16, b"z" * 16]).tolist() == [1]
