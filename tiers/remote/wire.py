"""Pipelined commands on one connection: each batch is written at once and the replies read in order.

Primitives (each takes a redis-py connection of one node; a connection-level error propagates, the
caller drops the connection and counts the node's keys as misses):
- `exists_many(conn, names)` -> list[bool]: one `EXISTS` per key, one round trip;
- `get_each(conn, names, on_reply)`: one `GET` per key, one round trip; `on_reply(i, value)` is called as
  each reply is parsed (value: bytes, None when absent, or the `ResponseError` of that key, e.g. `MOVED`),
  so the first block is checked and copied while the server still sends the rest;
- `set_many(conn, names, headers, payloads, ttl_s)` -> list of None (stored) or the `ResponseError`:
  pipelined `SET`s whose value is a 64-byte header followed by the payload. The command is packed by
  hand so that header and payload go out as two pieces of one bulk string: the payload (a memoryview of
  the caller's block) is sent as it is, never joined to its header in a new buffer.

Invariant: a batch's replies are all read (or the connection is dropped), so a connection returned to its
pool never holds a stale reply.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


def _error_type() -> type:
    from redis.exceptions import ResponseError

    return ResponseError


def _read(conn: Any) -> Any:
    """One reply; a per-command error reply is returned, not raised (the pipeline goes on)."""
    try:
        return conn.read_response()
    except _error_type() as err:
        return err


def exists_many(conn: Any, names: Sequence[bytes]) -> list[bool | BaseException]:
    """Whether each key exists (or the error reply for it), in one round trip."""
    conn.send_packed_command(conn.pack_commands([(b"EXISTS", name) for name in names]))
    out: list[bool | BaseException] = []
    for _ in names:
        reply = _read(conn)
        out.append(reply if isinstance(reply, BaseException) else bool(reply))
    return out


def get_each(conn: Any, names: Sequence[bytes], on_reply: Callable[[int, Any], None]) -> None:
    """Sends every `GET`, then hands each reply to `on_reply(i, value)` as it is parsed."""
    conn.send_packed_command(conn.pack_commands([(b"GET", name) for name in names]))
    for i in range(len(names)):
        on_reply(i, _read(conn))


def set_many(conn: Any, names: Sequence[bytes], headers: Sequence[bytes], payloads: Sequence[memoryview],
             ttl_s: int = 0) -> list[BaseException | None]:
    """Stores `header + payload` under each name (pipelined); returns None per stored value, else its error."""
    expire = b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl_s)), ttl_s) if ttl_s else b""
    argc = b"*5\r\n" if ttl_s else b"*3\r\n"
    chunks: list[bytes | memoryview] = []
    tail = b""
    for name, header, payload in zip(names, headers, payloads):
        size = len(header) + payload.nbytes
        chunks.append(b"%s%s$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s" % (tail, argc, len(name), name, size, header))
        chunks.append(payload)
        tail = b"\r\n" + expire
    chunks.append(tail)
    conn.send_packed_command(chunks)
    out: list[BaseException | None] = []
    for _ in names:
        reply = _read(conn)
        out.append(reply if isinstance(reply, BaseException) else None)
    return out
