"""The remote tier's tests run against real redis-server processes (session fixtures in tests/conftest.py:
`redis_single`, `redis_cluster`); skipped where redis-server or redis-py is missing."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["single", "cluster"])
def remote_url(request, redis_single, redis_cluster) -> str:
    """The URL of the single node, then of the cluster."""
    return redis_single.url if request.param == "single" else redis_cluster.url
