"""The `remote` tier: whole blocks on a Redis / Valkey node or Redis Cluster shared by serving replicas.

Primitives:
- `RemoteTier(spec, url, ...)`: a `Tier` below `disk`. Values are the disk tier's values (64-byte header
  with fingerprint, key, lengths, codec and xxh3 checksum, then the payload: `tiers/disk/format.py`), under
  the Redis key `kvtier:<fingerprint hex>:<salt tag>:<block key hex>` (`redis_key`), so models and
  tenants never share a key, and `SCAN MATCH kvtier:<fingerprint>:*` lists one model's blocks.
- `probe(keys)`: how many leading keys the remote holds: one pipelined `EXISTS` round trip per node, nodes
  in parallel (not one per block).
- `get_many(keys, outs, on_landed, batch_blocks)`: pipelined `GET`s batched per node, nodes in parallel;
  each value is checked (header, checksum) and copied into its destination (a contiguous CPU block, e.g.
  a host slot, or an engine block's memory runs) as its reply is parsed.
- `save_many(keys, blocks)` -> failed keys; `put_async(keys, blocks)`: the same on the tier's background
  worker; a block is acknowledged (`acknowledged_blocks`, the handle) once its node replied OK.
- `delete`, `contains`, `count_blocks()` (a SCAN: reports only), `stats()` -> `RemoteStats`, `describe()`.

Invariants:
- never wrong bytes: a value that is absent, of another model or key, damaged, or from a node that failed,
  timed out or answered MOVED is a miss, counted, never delivered; once `get_many` returned, nothing more is
  written into its destinations (a node that overran its deadline has its late replies dropped);
- no call waits on a silent node longer than `timeout_s` (a probe ends within it; a load or save within
  it plus its bytes at `MIN_BYTES_PER_S`, the rate below which a node counts as hung); a failure is a
  miss or a failed save, never an exception to the engine (`RemoteError` only at start: no node, wrong
  password);
- the server owns capacity and eviction (maxmemory + an LRU policy): kvtier never assumes a saved block is
  still there, and a node that failed is retried after `nodes.RETRY_S` (reconnects by itself).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..codecs import Codec, get_codec
from ..disk.format import HEADER_BYTES, checksum, encode_header
from ..disk.read import check_value
from ..errors import CapacityError, ConfigError, SpecMismatchError
from ..keys import BlockKey
from ..spec import KVSpec
from ..tier import Tier, TierName
from ..worker import PRIORITY_SAVE, TransferHandle
from . import wire
from .nodes import Node, NodeMap, _redis
from .settings import RemoteSettings, parse_remote_url
from .stats import Delivery, RemoteStats

log = logging.getLogger(__name__)

#: a call may take `timeout_s` plus its bytes at this rate: a node slower than this is treated as hung
MIN_BYTES_PER_S = 50e6

#: the nominal capacity of the decision half's books of remote blocks when none is given (the server's
#: own maxmemory bounds what it really keeps)
DEFAULT_CAPACITY = "64GiB"


class RemoteTier(Tier):
    """Blocks of one KVSpec on a Redis node or cluster (see the module docstring)."""

    name = TierName.REMOTE

    def __init__(self, spec: KVSpec, url: str | RemoteSettings, capacity_bytes: int | str = DEFAULT_CAPACITY, *,
                 timeout_s: float = 1.0, codec: Codec | str = Codec.NONE, zstd_level: int = 1, salt: str = "",
                 ttl_s: int = 0) -> None:
        """Connects to the remote and checks it answers.

        Args:
            spec: the KV geometry and model identity of the blocks.
            url: a `redis://`, `rediss://`, `redis+cluster://` URL or seed list (see `settings`), or parsed
                settings.
            capacity_bytes: what the decision half may assume the remote keeps for this model (its books);
                the server's maxmemory decides what it really keeps.
            timeout_s: the longest any call waits (connect, probe, load, save), `remote_timeout_s`.
            codec: how payloads are written (reads follow each value's header).
            salt: the tenant's cache salt (its hash goes in every Redis key).
            ttl_s: expiry of saved values in seconds (0: none; the server's LRU evicts).

        Raises:
            ConfigError: a bad URL, timeout, codec or ttl.
            RemoteAuthError: the server refused the credentials.
            RemoteError: no node answered within `timeout_s`, or redis-py is not installed.
        """
        super().__init__(spec, capacity_bytes)
        self.settings = url if isinstance(url, RemoteSettings) else parse_remote_url(url, timeout_s)
        if not isinstance(ttl_s, int) or ttl_s < 0:
            raise ConfigError(f"remote ttl_s: expected a non-negative int, got {ttl_s!r}")
        self.ttl_s = ttl_s
        self.timeout_s = self.settings.timeout_s
        self.codec = get_codec(codec, zstd_level)
        self._fp = spec.fingerprint_bytes
        tag = hashlib.blake2b(salt.encode(), digest_size=4).hexdigest() if salt else "-"
        self.prefix = f"kvtier:{spec.fingerprint}:{tag}:".encode()
        self._stats_lock = threading.Lock()
        self._n = dict(hits=0, misses=0, corrupt=0, foreign=0, unavailable=0, acknowledged_blocks=0, probes=0,
                       probed_blocks=0, bytes_read=0, bytes_written=0)
        self._closed = False
        self.nodes = NodeMap(self.settings)
        try:
            self.nodes.check()
        except BaseException:
            self.nodes.close()
            raise
        log.info("remote tier on %s (%s, %d node(s))", self.settings.describe(), self.settings.mode,
                 len(self.nodes.masters))

    # -- books -------------------------------------------------------------------------------------

    def redis_key(self, key: BlockKey) -> bytes:
        """The Redis key of a block: this model's and tenant's prefix, then the block key in hex."""
        if len(key) != 16:
            raise ConfigError(f"block key: expected 16 bytes, got {len(key)} ({bytes(key)[:20]!r})")
        return self.prefix + bytes(key).hex().encode()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                self._n[name] += delta

    def stats(self) -> RemoteStats:
        """A snapshot of the counters."""
        with self._stats_lock:
            return RemoteStats(**self._n)

    def describe(self) -> dict[str, Any]:
        """Where the tier is (password masked) and its settings, for reports."""
        return {"tier": str(self.name), "url": self.settings.describe(), "mode": str(self.settings.mode),
                "num_masters": len(self.nodes.masters), "timeout_s": self.timeout_s,
                "codec": self.codec.codec.label, "prefix": self.prefix.decode()}

    @property
    def num_used(self) -> int:
        return self.count_blocks()

    def count_blocks(self) -> int:
        """This model's and tenant's blocks on the remote now, by a SCAN of every master (slow: reports
        and tests only); nodes that fail are skipped."""
        total = 0
        for node in self.nodes.masters:
            try:
                with self.nodes.connection(node) as conn:
                    cursor = 0
                    while True:
                        conn.send_command("SCAN", cursor, "MATCH", self.prefix + b"*", "COUNT", 1000)
                        cursor, found = conn.read_response()
                        total += len(found)
                        if int(cursor) == 0:
                            break
            except (_redis().RedisError, OSError) as err:
                log.warning("remote count: node %s skipped: %s", node.name, err)
        return total

    # -- calls ---------------------------------------------------------------------------------------

    def _deadline(self, groups: dict[Node, list[int]], block_bytes: int) -> float:
        """When a call must end: `timeout_s` (no answer at all, or a socket silent that long, fails sooner),
        plus the largest node's bytes at `MIN_BYTES_PER_S`."""
        most = max((len(idx) for idx in groups.values()), default=0)
        return time.monotonic() + self.timeout_s + most * block_bytes / MIN_BYTES_PER_S

    def _call(self, keys: Sequence[BlockKey], work: Callable[[Node, Any, list[bytes], list[int]], None],
              block_bytes: int = 0) -> tuple[set[int], int]:
        """Runs `work(node, conn, names, indices)` on every node holding some of `keys`, in parallel, within
        the deadline (`block_bytes` per key moved). Returns the indices whose node failed (timeout,
        connection error) and how many."""
        names = [self.redis_key(k) for k in keys]
        groups, nowhere = self.nodes.route(names)
        failed = set(nowhere)

        def on_node(node: Node, idx: list[int]) -> None:
            with self.nodes.connection(node) as conn:
                work(node, conn, [names[i] for i in idx], idx)

        results = self.nodes.run(groups, on_node, self._deadline(groups, block_bytes))
        for node, result in results.items():
            if isinstance(result, BaseException):
                failed.update(groups[node])
                if not isinstance(result, _redis().ResponseError):
                    self.nodes.failed(node, result)
        return failed, len(failed)

    def _moved(self, reply: BaseException) -> None:
        if not isinstance(reply, _redis().ResponseError):
            return
        self.nodes.moved()

    def exists_many(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Whether the remote holds each key now (a failed node's keys: False); one round trip per node."""
        found = [False] * len(keys)

        def work(node: Node, conn: Any, names: list[bytes], idx: list[int]) -> None:
            for i, reply in zip(idx, wire.exists_many(conn, names)):
                if isinstance(reply, BaseException):
                    self._moved(reply)
                else:
                    found[i] = reply

        self._call(keys, work)
        self._count(probes=1, probed_blocks=len(keys))
        return found

    def probe(self, keys: Sequence[BlockKey]) -> int:
        """How many leading `keys` the remote holds now (one pipelined round trip per node)."""
        if not keys:
            return 0
        found = self.exists_many(keys)
        return next((i for i, ok in enumerate(found) if not ok), len(found))

    def contains(self, key: BlockKey) -> bool:
        return self.exists_many([key])[0]

    def get(self, key: BlockKey, out: Any = None) -> Any:
        """Reads one block into `out` (a new uint8 tensor when None); None on a miss."""
        import torch

        target = out if out is not None else torch.empty(self.spec.bytes_per_block, dtype=torch.uint8)
        return target if self.get_many([key], [target])[0] else None

    def get_many(self, keys: Sequence[BlockKey], outs: Sequence[Any],
                 on_landed: Callable[[list[int]], None] | None = None, batch_blocks: int = 4) -> list[bool]:
        """Reads blocks into `outs` (contiguous CPU tensors of one block, or per block a list of writable
        memory runs taking its payload in order), like `DiskTier.get_many`.

        `on_landed(indices)`, when given, is called with the indices of delivered blocks in batches of
        about `batch_blocks` (from the node threads, under no lock of the caller's).

        Returns:
            which blocks were delivered; a miss leaves its `out` undefined.

        Raises:
            ConfigError: `outs` and `keys` differ in length, or an output is not on the CPU.
            SpecMismatchError: an output does not hold exactly one block.
        """
        if len(keys) != len(outs):
            raise ConfigError(f"get_many: {len(keys)} keys but {len(outs)} outputs")
        dsts = [self._destination(out) for out in outs]
        found = [False] * len(keys)
        bad = {"corrupt": 0, "foreign": 0}
        delivery = Delivery()
        itemsize, fp = self.spec.itemsize, self._fp
        read = [0]

        def work(node: Node, conn: Any, names: list[bytes], idx: list[int]) -> None:
            landed: list[int] = []

            def on_reply(j: int, value: Any) -> None:
                i = idx[j]
                if value is None:
                    return
                if isinstance(value, BaseException):
                    self._moved(value)
                    return
                view = memoryview(value)
                if not delivery.begin():
                    return
                try:
                    reason = check_value(view, fp, keys[i], dsts[i], itemsize)
                    found[i] = reason is None
                finally:
                    delivery.end()
                read[0] += len(view)
                if reason is None:
                    landed.append(i)
                else:
                    bad[reason if reason in bad else "corrupt"] += 1
                if on_landed is not None and len(landed) >= batch_blocks:
                    on_landed(landed[:])
                    landed.clear()

            wire.get_each(conn, names, on_reply)
            if on_landed is not None and landed:
                on_landed(landed)

        _, num_failed = self._call(keys, work, self.spec.bytes_per_block)
        delivery.close(self.timeout_s)
        delivered = list(found)
        hits = sum(delivered)
        self._count(hits=hits, misses=len(keys) - hits, corrupt=bad["corrupt"], foreign=bad["foreign"],
                    unavailable=num_failed, bytes_read=read[0])
        if bad["corrupt"] or bad["foreign"]:
            log.warning("remote: %d damaged and %d foreign values read as misses", bad["corrupt"], bad["foreign"])
        return delivered

    def _destination(self, out: Any) -> Any:
        if hasattr(out, "device"):  # a torch tensor
            if out.device.type != "cpu":
                raise ConfigError(f"get_many: outputs must be CPU tensors, got one on {out.device}")
            return self.check_block(out, "out").numpy()
        if isinstance(out, np.ndarray):
            return out.reshape(-1).view(np.uint8)
        runs = list(out)
        size = sum(r.nbytes for r in runs)
        if size != self.spec.bytes_per_block or any(r.readonly or not r.c_contiguous for r in runs):
            raise SpecMismatchError(f"out: memory runs of {size} bytes; expected {self.spec.bytes_per_block} "
                                    f"writable contiguous bytes")
        return [r.cast("B") if r.format != "B" else r for r in runs]

    # -- writes --------------------------------------------------------------------------------------

    def _encode(self, key: BlockKey, flat: np.ndarray) -> tuple[bytes, memoryview]:
        """Header and payload of one block's value (the raw payload is the block's own memory)."""
        raw_len = flat.size
        if not self.codec.compresses:
            return encode_header(self._fp, key, Codec.NONE, raw_len, raw_len, checksum(flat)), flat.data
        payload = self.codec.encode(flat, self.spec.itemsize)
        return encode_header(self._fp, key, self.codec.codec, len(payload), raw_len, checksum(payload)), \
            memoryview(payload)

    def _flats(self, keys: Sequence[BlockKey], blocks: Sequence[Any]) -> list[np.ndarray]:
        if len(keys) != len(blocks):
            raise ConfigError(f"put: {len(keys)} keys but {len(blocks)} blocks")
        out = []
        for block in blocks:
            if isinstance(block, np.ndarray):
                flat = block.reshape(-1).view(np.uint8)
                if flat.size != self.spec.bytes_per_block:
                    raise SpecMismatchError(f"put block: expected {self.spec.bytes_per_block} bytes, got {flat.size}")
                out.append(flat)
            else:
                out.append(self.check_block(block.cpu() if block.device.type != "cpu" else block, "put block").numpy())
        return out

    def save_many(self, keys: Sequence[BlockKey], blocks: Sequence[Any]) -> list[BlockKey]:
        """Stores blocks with pipelined SETs per node, nodes in parallel; returns the keys not stored (their
        node failed, timed out or moved the slot). Acknowledged when the servers replied."""
        flats = self._flats(keys, blocks)
        stored = [False] * len(keys)
        written = [0]

        def work(node: Node, conn: Any, names: list[bytes], idx: list[int]) -> None:
            parts = [self._encode(keys[i], flats[i]) for i in idx]
            replies = wire.set_many(conn, names, [h for h, _ in parts], [p for _, p in parts], self.ttl_s)
            for i, (header, payload), reply in zip(idx, parts, replies):
                if reply is None:
                    stored[i] = True
                    written[0] += len(header) + payload.nbytes
                else:
                    self._moved(reply)

        _, num_failed = self._call(keys, work, self.spec.bytes_per_block)
        ok = sum(stored)
        self._count(acknowledged_blocks=ok, unavailable=num_failed, bytes_written=written[0])
        return [k for k, s in zip(keys, stored) if not s]

    def put(self, key: BlockKey, block: Any) -> None:
        self.put_many([key], [block])

    def put_many(self, keys: Sequence[BlockKey], blocks: Sequence[Any]) -> None:
        """Stores blocks (synchronously).

        Raises:
            CapacityError: some blocks were not stored (their node failed, or it is out of memory).
        """
        failed = self.save_many(keys, blocks)
        if failed:
            raise CapacityError(f"remote {self.settings.describe()}: {len(failed)} of {len(keys)} blocks not stored")

    def put_async(self, keys: Sequence[BlockKey], blocks: Sequence[Any],
                  on_commit: Callable[[list[BlockKey]], None] | None = None) -> TransferHandle:
        """Stores blocks on the tier's background worker; the handle completes when the servers replied, its
        `failed` listing the keys not stored. The blocks' memory must stay unchanged until then."""
        keys = list(keys)
        self._flats(keys, blocks)  # bad input fails here, in the caller

        def work() -> list[BlockKey]:
            failed = self.save_many(keys, blocks)
            if on_commit is not None:
                on_commit([k for k in keys if k not in set(failed)])
            return failed

        return self._background().submit(work, TransferHandle(keys), PRIORITY_SAVE)

    def delete(self, key: BlockKey) -> bool:
        deleted = [False]

        def work(node: Node, conn: Any, names: list[bytes], idx: list[int]) -> None:
            conn.send_command(b"DEL", *names)
            deleted[0] = bool(conn.read_response())

        self._call([key], work)
        return deleted[0]

    def flush(self, timeout: float | None = 60.0) -> None:
        """Waits until queued background saves have been answered."""
        self._background().submit(lambda: None).wait(timeout)

    def close(self) -> None:
        """Finishes queued saves, then closes every connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        super().close()
        self.nodes.close()
