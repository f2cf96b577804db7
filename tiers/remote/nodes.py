"""The remote's nodes: connections, key routing (hash slots) and health, with calls bounded in time.

Primitives:
- `Node`: one server (host, port): a redis-py connection pool, and `down_until` (a node that failed is
  skipped until then, so a dead node costs one failed connect per `RETRY_S`, not one per call).
- `NodeMap(settings)`: every node and, for a cluster, the slot map (`CLUSTER SLOTS`). `check()` connects
  at start and raises a clear error for a wrong password or no reachable node. `route(keys)` groups key
  indices by the master holding their slot; `run(groups, fn, deadline_s)` runs `fn(node, indices)` for
  every node at once on the map's threads and returns each node's result, or the exception that ended it
  (a timeout once the deadline passed). `failed(node, err)` marks a node down and schedules a slot-map
  refresh; `moved()` schedules one too (a `MOVED` reply).
- `connection(node)`: a context manager lending one connection of a node (dropped on error, so a
  connection reset is followed by a fresh connect next time).

Invariants:
- every socket has `timeout_s` for connect, send and each read; `run` waits at most until its deadline
  (the work of a node that overran is abandoned: the caller treats its keys as misses);
- the slot map is refreshed at most once per `REFRESH_S`, from any node that answers; keys of a slot no
  known node holds are routed nowhere (misses);
- nothing here logs or raises a password.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterator, Sequence

from ..errors import RemoteAuthError, RemoteError
from .settings import PASSWORD_ENV, RemoteMode, RemoteSettings

log = logging.getLogger(__name__)

NUM_SLOTS = 16384
#: a node that failed is left alone this long before the next connect attempt
RETRY_S = 1.0
#: the slot map is fetched at most this often
REFRESH_S = 0.5


def _redis() -> Any:
    try:
        import redis
    except ImportError as err:  # the optional extra
        raise RemoteError("the remote tier needs redis-py: pip install 'kvtier[remote]'") from err
    return redis


def key_slot(key: bytes) -> int:
    """The cluster hash slot of a key (CRC16-XMODEM mod 16384; kvtier keys carry no hash tags)."""
    from binascii import crc_hqx

    return crc_hqx(key, 0) % NUM_SLOTS


class Node:
    """One server of the remote."""

    __slots__ = ("host", "port", "pool", "down_until", "last_error")

    def __init__(self, host: str, port: int, settings: RemoteSettings) -> None:
        redis = _redis()
        self.host, self.port = host, port
        self.pool = redis.ConnectionPool(host=host, port=port,
                                         **settings.connection_kwargs())
        self.down_until = 0.0
        self.last_error = ""

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Node({self.name})"

    def close(self) -> None:
        self.pool.disconnect()


class NodeMap:
    """The remote's nodes and where each key lives (see the module docstring)."""

    def __init__(self, settings: RemoteSettings, max_threads: int = 16) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._nodes: dict[tuple[str, int], Node] = {}
        self._slots: list[Node | None] = []
        self._refresh_after = 0.0
        self._closed = False
        for host, port in settings.nodes:
            self._node(host, port)
        if settings.mode is RemoteMode.SINGLE:
            only = self._nodes[settings.nodes[0]]
            self._slots = [only]
        self._pool = ThreadPoolExecutor(max(2, min(max_threads, 4 * len(settings.nodes) + 2)), "kvtier-remote")

    def _node(self, host: str, port: int) -> Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[(host, port)] = Node(host, port, self.settings)
        return node

    @property
    def nodes(self) -> list[Node]:
        """Every known node (masters of the slot map and the seeds)."""
        with self._lock:
            return list(self._nodes.values())

    @property
    def masters(self) -> list[Node]:
        """The nodes that hold slots now (the single node, or the cluster's masters)."""
        with self._lock:
            seen: dict[int, Node] = {}
            for node in self._slots if len(self._slots) > 1 else self._slots[:1]:
                if node is not None:
                    seen[id(node)] = node
            return list(seen.values())

    # -- start and slot map ------------------------------------------------------------------------

    def check(self) -> None:
        """Connects to the seeds (and loads the slot map of a cluster).

        Raises:
            RemoteAuthError: the server refused the credentials (a wrong or missing password).
            RemoteError: no node answered, or a node is not in the mode the URL says.
        """
        errors = []
        for host, port in self.settings.nodes:
            node = self._node(host, port)
            try:
                with self.connection(node) as conn:
                    conn.send_command("PING")
                    conn.read_response()
                    if self.settings.mode is RemoteMode.CLUSTER:
                        conn.send_command("CLUSTER", "SLOTS")
                        self._load_slots(conn.read_response())
                return
            except _redis().AuthenticationError as err:
                raise RemoteAuthError(f"remote {self.settings.describe()}: node {node.name} refused the credentials "
                                      f"({err}); check the password in remote_url or ${PASSWORD_ENV}") from None
            except _redis().ResponseError as err:
                if "cluster support disabled" in str(err).lower():
                    raise RemoteError(f"remote {self.settings.describe()}: node {node.name} is not in cluster mode; "
                                      f"use a redis:// URL for a single node") from None
                errors.append(f"{node.name}: {err}")
            except (_redis().RedisError, OSError) as err:
                errors.append(f"{node.name}: {err}")
        raise RemoteError(f"remote {self.settings.describe()}: no node answered within "
                          f"{self.settings.timeout_s} s ({'; '.join(errors)})")

    def _load_slots(self, reply: Sequence[Any]) -> None:
        slots: list[Node | None] = [None] * NUM_SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            node = self._node(host or self.settings.nodes[0][0], int(master[1]))
            for slot in range(start, end + 1):
                slots[slot] = node
        with self._lock:
            self._slots = slots

    def refresh(self) -> None:
        """Reloads the slot map from the first node that answers (at most once per `REFRESH_S`)."""
        if self.settings.mode is not RemoteMode.CLUSTER:
            return
        now = time.monotonic()
        with self._lock:
            if now < self._refresh_after:
                return
            self._refresh_after = now + REFRESH_S
        for node in sorted(self.nodes, key=lambda n: n.down_until):
            if node.down_until > now:
                continue
            try:
                with self.connection(node) as conn:
                    conn.send_command("CLUSTER", "SLOTS")
                    self._load_slots(conn.read_response())
                return
            except (_redis().RedisError, OSError) as err:
                self.failed(node, err, refresh=False)

    def moved(self) -> None:
        """A node answered MOVED / ASK / CLUSTERDOWN: the slot map is reloaded in the background."""
        self._submit_refresh()

    def failed(self, node: Node, err: BaseException, refresh: bool = True) -> None:
        """Marks `node` down for `RETRY_S` (its keys are misses meanwhile) and reloads the slot map."""
        node.down_until = time.monotonic() + RETRY_S
        node.last_error = f"{type(err).__name__}: {err}"
        node.pool.disconnect(inuse_connections=False)
        log.warning("remote node %s failed (%s); its keys are misses for %.1f s", node.name, node.last_error, RETRY_S)
        if refresh:
            self._submit_refresh()

    def _submit_refresh(self) -> None:
        if self.settings.mode is RemoteMode.CLUSTER and not self._closed:
            try:
                self._pool.submit(self.refresh)
            except RuntimeError:  # shut down meanwhile
                pass

    # -- routing and calls --------------------------------------------------------------------------

    def route(self, keys: Sequence[bytes]) -> tuple[dict[Node, list[int]], list[int]]:
        """Groups key indices by the node holding them now; also returns the indices routed nowhere
        (their slot has no master, or its node is down)."""
        now = time.monotonic()
        groups: dict[Node, list[int]] = {}
        nowhere: list[int] = []
        with self._lock:
            slots = self._slots
        single = slots[0] if len(slots) == 1 else None
        for i, key in enumerate(keys):
            node = single if single is not None else slots[key_slot(key)]
            if node is None or node.down_until > now:
                nowhere.append(i)
            else:
                groups.setdefault(node, []).append(i)
        return groups, nowhere

    @contextlib.contextmanager
    def connection(self, node: Node) -> Iterator[Any]:
        """One connection of `node`, returned to its pool after use, dropped after an error."""
        conn = node.pool.get_connection()
        try:
            yield conn
        except BaseException:
            conn.disconnect()
            raise
        finally:
            node.pool.release(conn)

    def run(self, groups: dict[Node, list[int]], fn: Callable[[Node, list[int]], Any],
            deadline_s: float) -> dict[Node, Any]:
        """Runs `fn(node, indices)` for every node at once; waits until `deadline_s` (a `time.monotonic`
        value) at most. Returns each node's result, or the exception that ended it (`TimeoutError` for
        one still running at the deadline: its work is abandoned)."""
        futures: dict[Node, Future] = {node: self._pool.submit(fn, node, idx) for node, idx in groups.items()}
        out: dict[Node, Any] = {}
        for node, future in futures.items():
            try:
                out[node] = future.result(timeout=max(0.0, deadline_s - time.monotonic()))
            except FutureTimeout:
                out[node] = TimeoutError(f"remote node {node.name}: no answer within the deadline")
            except BaseException as err:  # reported to the caller per node
                out[node] = err
        return out

    def close(self) -> None:
        """Joins the threads and closes every connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        for node in self.nodes:
            node.close()
