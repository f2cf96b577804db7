"""Where the remote tier is and how to reach it: one URL (or a list of seed nodes) parsed once.

Primitives:
- `RemoteMode`: `single` (one Redis / Valkey node) or `cluster` (Redis Cluster: hash slots over masters).
- `RemoteSettings`: the parsed form (nodes, TLS, credentials, database, timeout); frozen, its password
  never in `repr` nor in `describe()`.
- `parse_remote_url(url, timeout_s, env)`: accepts
  - `redis://[user:password@]host:port[/db]`: a single node;
  - `rediss://...`: the same over TLS (query keys `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
    `ssl_cert_reqs` = none|optional|required);
  - `redis+cluster://[user:password@]host:port[,host:port...]` (or `rediss+cluster://`): a cluster
    reached through these seed nodes;
  - a comma-separated list of `host:port` or `redis://host:port` seeds: a cluster as well.
  A password absent from the URL is taken from `$KVTIER_REMOTE_PASSWORD` (and the user from
  `$KVTIER_REMOTE_USERNAME`), so a config file need not hold it.

Invariants: every error names the URL with its password masked; the password appears in no message,
log line or `repr`.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigError

#: environment variables read when the URL carries no credentials
PASSWORD_ENV = "KVTIER_REMOTE_PASSWORD"
USERNAME_ENV = "KVTIER_REMOTE_USERNAME"

DEFAULT_PORT = 6379
_CERT_REQS = {"none": "none", "optional": "optional", "required": "required"}


class RemoteMode(str, enum.Enum):
    """How keys map to nodes."""

    #: one node holds every key
    SINGLE = "single"
    #: Redis Cluster: a key's hash slot (CRC16 mod 16384) names the master that holds it
    CLUSTER = "cluster"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """The parsed remote URL.

    Attributes:
        mode: single node or cluster.
        nodes: (host, port) of the node, or the cluster's seed nodes.
        tls: connect with TLS (`rediss`).
        username / password: credentials (None: none); the password is never shown.
        db: database number (single node only; a cluster has only database 0).
        timeout_s: the longest any call to the remote may take (connect, send, reply).
        tls_options: `ssl_*` keyword arguments for redis-py (CA file, client certificate, checks).
    """

    mode: RemoteMode
    nodes: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    timeout_s: float = 1.0
    tls_options: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """The URL with the password masked, for logs and reports."""
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.mode is RemoteMode.CLUSTER else "")
        user = self.username or ""
        auth = f"{user}:***@" if self.password else (f"{user}@" if user else "")
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{auth}{hosts}" + (f"/{self.db}" if self.db else "")

    def connection_kwargs(self) -> dict[str, object]:
        """Keyword arguments of a redis-py connection to one node (host and port added per node)."""
        kwargs: dict[str, object] = dict(username=self.username, password=self.password, db=self.db,
                                         socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                                         socket_keepalive=True, retry_on_timeout=False, retry=None,
                                         socket_read_size=1 << 20)
        if self.tls:
            from redis.connection import SSLConnection

            kwargs["connection_class"] = SSLConnection
            kwargs.update(dict(self.tls_options))
        return kwargs


def _split_hostport(text: str, url: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host:
        raise ConfigError(f"remote_url {url!r}: a node has no host (expected host:port)")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"remote_url {url!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ConfigError(f"remote_url {url!r}: port {number} is out of range 1-65535")
    return host, number


def _masked(url: str) -> str:
    """`url` with any password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    auth, _, hosts = rest.rpartition("@")
    user = auth.partition(":")[0]
    return f"{scheme}://{user}:***@{hosts}" if ":" in auth else url


def parse_remote_url(url: str, timeout_s: float = 1.0, env: Mapping[str, str] | None = None) -> RemoteSettings:
    """Parses a remote URL or seed list (see the module docstring).

    Args:
        url: the URL.
        timeout_s: the per-call time limit (`remote_timeout_s`).
        env: where credentials absent from the URL are looked up (default: `os.environ`).

    Raises:
        ConfigError: an unknown scheme, a bad host or port, a database other than 0 for a cluster, a
            timeout that is not positive (the URL named with its password masked).
    """
    env = os.environ if env is None else env
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"remote_url: expected a redis:// or redis+cluster:// URL, got {url!r}")
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise ConfigError(f"remote_timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    text = url.strip()
    shown = _masked(text)
    if "://" not in text or ("," in text and "+cluster://" not in text):
        seeds = [s.strip() for s in text.split(",") if s.strip()]
        if any("://" in s and not s.startswith(("redis://", "rediss://")) for s in seeds):
            raise ConfigError(f"remote_url {shown!r}: a seed list takes host:port or redis://host:port entries")
        tls = all(s.startswith("rediss://") for s in seeds) and bool(seeds)
        first = urlsplit(seeds[0]) if "://" in seeds[0] else None
        nodes = tuple(_split_hostport(s.split("://", 1)[-1].rsplit("@", 1)[-1].split("/")[0], shown) for s in seeds)
        user = unquote(first.username) if first is not None and first.username else None
        password = unquote(first.password) if first is not None and first.password else None
        mode = RemoteMode.CLUSTER if len(nodes) > 1 else RemoteMode.SINGLE
        return _finish(mode, nodes, tls, user, password, 0, timeout_s, (), env)
    scheme, _, rest = text.partition("://")
    schemes = {"redis": (False, RemoteMode.SINGLE), "rediss": (True, RemoteMode.SINGLE),
               "redis+cluster": (False, RemoteMode.CLUSTER), "rediss+cluster": (True, RemoteMode.CLUSTER)}
    if scheme.lower() not in schemes:
        raise ConfigError(f"remote_url {shown!r}: scheme {scheme!r} is not one of {', '.join(schemes)}")
    tls, mode = schemes[scheme.lower()]
    parts = urlsplit("redis://" + rest)
    netloc = parts.netloc.rpartition("@")[2]
    nodes = tuple(_split_hostport(n, shown) for n in netloc.split(",") if n)
    if not nodes:
        raise ConfigError(f"remote_url {shown!r}: no host:port given")
    if mode is RemoteMode.SINGLE and len(nodes) > 1:
        mode = RemoteMode.CLUSTER
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ConfigError(f"remote_url {shown!r}: database {path!r} is not a number") from None
    if db and mode is RemoteMode.CLUSTER:
        raise ConfigError(f"remote_url {shown!r}: a cluster has only database 0, got /{db}")
    options = []
    for name, values in parse_qs(parts.query).items():
        if not name.startswith("ssl_"):
            raise ConfigError(f"remote_url {shown!r}: unknown option {name!r} (expected ssl_* options)")
        value = values[-1]
        if name == "ssl_cert_reqs" and value not in _CERT_REQS:
            raise ConfigError(f"remote_url {shown!r}: ssl_cert_reqs={value!r}; expected none, optional or required")
        options.append((name, value))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return _finish(mode, nodes, tls, user, password, db, timeout_s, tuple(options), env)


def _finish(mode: RemoteMode, nodes: tuple[tuple[str, int], ...], tls: bool, user: str | None,
            password: str | None, db: int, timeout_s: float, options: tuple[tuple[str, str], ...],
            env: Mapping[str, str]) -> RemoteSettings:
    if password is None and env.get(PASSWORD_ENV):
        password = env[PASSWORD_ENV]
        user = user or env.get(USERNAME_ENV) or None
    return RemoteSettings(mode, nodes, tls, user, password, db, float(timeout_s), options)
