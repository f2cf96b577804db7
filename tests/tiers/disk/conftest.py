"""Fixtures of the disk-tier tests: a store directory in a temp dir, and an open tier on it."""

from __future__ import annotations

import pytest

from diskutil import SPEC
from kvtier.tiers.disk.store import DiskTier


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def tier(store):
    t = DiskTier(store, SPEC, 64 * SPEC.bytes_per_block)
    yield t
    t.close()
