"""Remote URLs: single node, cluster, seed lists, TLS, credentials from the URL or the environment."""

from __future__ import annotations

import pytest

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.remote.settings import RemoteMode, parse_remote_url


def test_single_node_url_with_credentials_and_db():
    s = parse_remote_url("redis://alice:p%40ss@cache.local:6380/2", timeout_s=0.5, env={})
    assert (s.mode, s.nodes, s.username, s.password, s.db, s.tls) == (
        RemoteMode.SINGLE, (("cache.local", 6380),), "alice", "p@ss", 2, False)
    assert s.timeout_s == 0.5


def test_cluster_url_and_seed_list():
    s = parse_remote_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", env={})
    assert s.mode is RemoteMode.CLUSTER and s.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    seeds = parse_remote_url("10.0.0.1:7000,10.0.0.2:7001,redis://10.0.0.3:7002", env={})
    assert seeds.mode is RemoteMode.CLUSTER and seeds.nodes[2] == ("10.0.0.3", 7002)
    assert parse_remote_url("cache.local", env={}).nodes == (("cache.local", 6379),)


def test_tls_url_options():
    s = parse_remote_url("rediss+cluster://h:7000?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required", env={})
    assert s.tls and s.mode is RemoteMode.CLUSTER
    assert dict(s.tls_options) == {"ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required"}
    assert s.describe().startswith("rediss+cluster://")


def test_password_from_environment_and_never_shown():
    s = parse_remote_url("redis://h:1", env={"KVTIER_REMOTE_PASSWORD": "hunter2", "KVTIER_REMOTE_USERNAME": "bob"})
    assert (s.username, s.password) == ("bob", "hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in s.describe() and "***" in s.describe()
    # the URL's own password wins over the environment
    assert parse_remote_url("redis://:mine@h:1", env={"KVTIER_REMOTE_PASSWORD": "env"}).password == "mine"


@pytest.mark.parametrize("url, match", [
    ("http://h:1", "scheme 'http'"),
    ("redis://h:notaport", "port 'notaport' is not a number"),
    ("redis://h:70000", "out of range"),
    ("redis+cluster://h:1/3", "only database 0"),
    ("redis://h:1?timeout=3", "unknown option 'timeout'"),
    ("rediss://h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe'"),
    ("", "expected a redis://"),
])
def test_bad_urls_are_named(url, match):
    with pytest.raises(ConfigError, match=match):
        parse_remote_url(url, env={})


def test_error_masks_the_password():
    with pytest.raises(ConfigError) as err:
        parse_remote_url("redis://u:topsecret@h:badport", env={})
    assert "topsecret" not in str(err.value) and "***" in str(err.value)


def test_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="remote_timeout_s"):
        parse_remote_url("redis://h:1", timeout_s=0, env={})
