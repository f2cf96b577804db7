"""Real redis-server processes for the remote tier's tests: one node and one 3-master cluster per session,
started on free loopback ports and ended at the end (skipped where redis-server or redis-py is missing)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("redis", reason="the remote tier needs the 'remote' extra (redis-py)")
if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
    pytest.skip("redis-server / redis-cli not installed (apt-get install redis-server)", allow_module_level=True)

from kvtier.tiers.remote.local import LocalRedis  # noqa: E402

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="session")
def redis_single():
    """One Redis node with a password."""
    with LocalRedis(0, password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-master Redis Cluster (no replicas), shared by the tests that do not kill its nodes."""
    with LocalRedis(3) as cluster:
        yield cluster


@pytest.fixture(params=["single", "cluster"])
def remote_url(request, redis_single, redis_cluster) -> str:
    """The URL of the single node, then of the cluster."""
    return redis_single.url if request.param == "single" else redis_cluster.url
