"""Request traces: Mooncake JSONL, kvtier JSONL and Azure CSV (each also gzipped) -> `Request`s.

Formats (`TraceFormat`):
- `mooncake`: one JSON object a line: `timestamp` (ms), `input_length`, `output_length`, `hash_ids`
  (one already-chained id per 512-token block, the partial last block included).
- `kvtier`: one JSON object a line: `timestamp` (s), optional `session` (or `session_id`), either
  `hash_ids` or `token_ids`, `input_length` (optional with `token_ids`), `output_length`, optional
  `block_size` (tokens per hash id; default 512) and `request_id`, and the optional retention hints
  `priority` (int; negative: keep its blocks least) and `continues` (bool: false when the session ends
  with this request). `kvtier gen-trace` writes this format.
- `azure-csv`: the Azure LLM inference trace: a header with `TIMESTAMP`, `ContextTokens`,
  `GeneratedTokens`; every request is a unique prompt (fresh ids no other request shares).
A `.gz` file is read through gzip. The format is detected from the first record unless given:
a CSV header -> azure-csv; a JSON object with `token_ids`, `session`, `session_id` or `block_size` -> kvtier;
otherwise mooncake.

Primitives: `Request` (one record), `Trace` (the records and what was skipped), `read_trace`,
`detect_format`, `block_weights` (tokens of each block, as kvcache-simulator counts them).

Invariants: a malformed record raises `TraceFormatError` naming file:line and what was wrong
("trace.jsonl:17: 'hash_ids' must be a list of ints, got str"), or with `skip_bad` is counted in
`Trace.skipped` and left out. Requests keep file order (replay runs them in that order, as
kvcache-simulator does); `arrival_s` counts from the first record.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import IO, Any, Iterator

from kvtier.tiers.errors import TraceFormatError

#: tokens per id of a Mooncake trace (and the kvtier format's default)
MOONCAKE_BLOCK_TOKENS = 512
#: the public Mooncake conversation trace shipped in the repository (`experiments/traces/`, Apache-2.0);
#: `kvtier replay mooncake` replays it
MOONCAKE_TRACE = Path(__file__).resolve().parents[2] / "experiments" / "traces" / "mooncake_conversation_trace.jsonl"


class TraceFormat(str, Enum):
    """The trace formats `read_trace` understands."""

    MOONCAKE = "mooncake"
    KVTIER = "kvtier"
    AZURE_CSV = "azure-csv"


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a trace.

    Attributes:
        request_id: the trace's id, or the record's index.
        arrival_s: arrival time in seconds from the trace's first request.
        input_tokens: prompt length in tokens.
        output_tokens: tokens generated.
        block_ids: one id per block of `block_tokens` tokens (chained: equal ids, equal prefix),
            the partial last block included; None when the trace gives `token_ids` instead.
        token_ids: the prompt's token ids (kvtier traces only), else None.
        session: conversation or agent id when the trace has one.
        block_tokens: tokens per block id.
        line: the record's line number in its file (1-based), for messages.
        priority: retention hint: negative when the request's own blocks may go first (default 0).
        continues: retention hint: False when its session ends with this request; None: not said.
    """

    request_id: int | str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_ids: tuple[int, ...] | None
    token_ids: tuple[int, ...] | None = None
    session: str | None = None
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    line: int = 0
    priority: int = 0
    continues: bool | None = None

    @property
    def num_blocks(self) -> int:
        """Blocks of the prompt (ids, or ceil(tokens / block_tokens) for token ids)."""
        if self.block_ids is not None:
            return len(self.block_ids)
        return -(-len(self.token_ids or ()) // self.block_tokens)


@dataclass(slots=True)
class Trace:
    """The requests of one trace file, in file order."""

    path: str
    format: TraceFormat
    requests: list[Request] = field(default_factory=list)
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few skipped lines' messages

    def skip(self, err: TraceFormatError, skip_bad: bool) -> None:
        """Counts a malformed record (keeping the first few messages), or raises `err` unless `skip_bad`."""
        if not skip_bad:
            raise err
        self.skipped += 1
        if len(self.errors) < 5:
            self.errors.append(str(err))


def block_weights(input_tokens: int, num_blocks: int, block_tokens: int) -> list[int]:
    """Tokens of each block: full blocks `block_tokens`, the last what is left (at least 1).

    Same rule as kvcache-simulator: block i holds max(1, min(B, input_tokens - i * B)) tokens.
    """
    full = min(num_blocks, max(0, input_tokens // block_tokens))
    weights = [block_tokens] * full
    if full < num_blocks:
        weights.append(max(1, input_tokens - full * block_tokens))
        weights.extend([1] * (num_blocks - full - 1))
    return weights


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def detect_format(path: str | Path) -> TraceFormat:
    """The format of a trace file from its first non-empty line (module docstring).

    Raises:
        TraceFormatError: the file cannot be read or has no record.
    """
    p = Path(path)
    try:
        with _open_text(p) as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if not text:
                    continue
                if not text.startswith("{"):
                    return TraceFormat.AZURE_CSV
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise TraceFormatError(f"{p.name}:{number}: not JSON ({err.msg})") from None
                if isinstance(record, dict) and ({"token_ids", "session", "session_id", "block_size"} & record.keys()):
                    return TraceFormat.KVTIER
                return TraceFormat.MOONCAKE
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as err:
        raise TraceFormatError(f"{p}: cannot read the trace ({err})") from err
    raise TraceFormatError(f"{p}: empty trace (no record)")


def _int_field(record: dict, name: str, where: str, required: bool = True, minimum: int = 0) -> int:
    value = record.get(name)
    if value is None:
        if required:
            raise TraceFormatError(f"{where}: missing {name!r}")
        return 0
    if type(value) is not int:
        raise TraceFormatError(f"{where}: {name!r} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise TraceFormatError(f"{where}: {name!r} must be >= {minimum}, got {value}")
    return value


def _id_list(record: dict, name: str, where: str) -> tuple[int, ...]:
    ids = record[name]
    if not isinstance(ids, list):
        raise TraceFormatError(f"{where}: {name!r} must be a list of ints, got {type(ids).__name__}")
    for x in ids:
        if type(x) is not int:
            raise TraceFormatError(f"{where}: {name!r} must be a list of ints, got an element of type "
                                   f"{type(x).__name__} ({x!r:.20})")
    if not ids:
        raise TraceFormatError(f"{where}: {name!r} is empty")
    return tuple(ids)


def _json_record(text: str, where: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise TraceFormatError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _time(record: dict, where: str) -> float:
    t = record.get("timestamp")
    if t is None:
        raise TraceFormatError(f"{where}: missing 'timestamp'")
    if type(t) not in (int, float) or not math.isfinite(t) or t < 0:
        raise TraceFormatError(f"{where}: 'timestamp' must be a number >= 0, got {t!r:.30}")
    return float(t)


def _mooncake(record: dict, index: int, number: int, where: str, t0: list[float]) -> Request:
    ms = _time(record, where)
    if not t0:
        t0.append(ms)
    if "hash_ids" not in record:
        raise TraceFormatError(f"{where}: missing 'hash_ids'")
    ids = _id_list(record, "hash_ids", where)
    return Request(index, (ms - t0[0]) / 1000.0, _int_field(record, "input_length", where, minimum=1),
                   _int_field(record, "output_length", where, required=False), ids, None, None,
                   MOONCAKE_BLOCK_TOKENS, number)


def _kvtier(record: dict, index: int, number: int, where: str, t0: list[float]) -> Request:
    s = _time(record, where)
    if not t0:
        t0.append(s)
    block = record.get("block_size", MOONCAKE_BLOCK_TOKENS)
    if type(block) is not int or block < 1:
        raise TraceFormatError(f"{where}: 'block_size' must be an int >= 1, got {block!r:.30}")
    has_hash, has_tokens = "hash_ids" in record, "token_ids" in record
    if has_hash == has_tokens:
        raise TraceFormatError(f"{where}: expected exactly one of 'hash_ids' and 'token_ids'")
    ids = _id_list(record, "hash_ids", where) if has_hash else None
    tokens = _id_list(record, "token_ids", where) if has_tokens else None
    n_in = _int_field(record, "input_length", where, required=has_hash, minimum=1 if has_hash else 0)
    if tokens is not None:
        n_in = n_in or len(tokens)
    session = record.get("session", record.get("session_id"))
    rid = record.get("request_id", index)
    priority = record.get("priority", 0)
    if type(priority) is not int:
        raise TraceFormatError(f"{where}: 'priority' must be an int, got {priority!r:.30}")
    continues = record.get("continues")
    if continues is not None and type(continues) is not bool:
        raise TraceFormatError(f"{where}: 'continues' must be true or false, got {continues!r:.30}")
    return Request(rid, s - t0[0], n_in, _int_field(record, "output_length", where, required=False), ids, tokens,
                   None if session is None else str(session), block, number, priority, continues)


def _parse_azure_time(value: str, where: str) -> float:
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    head, _, frac = text.partition(".")
    try:
        base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
        return base + (float("0." + frac) if frac else 0.0)
    except ValueError:
        raise TraceFormatError(f"{where}: 'TIMESTAMP' must be a time (YYYY-MM-DD HH:MM:SS[.fff]) or a "
                               f"number, got {text!r:.40}") from None


def _read_azure(f: IO[str], name: str, trace: Trace, skip_bad: bool, block_tokens: int) -> None:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise TraceFormatError(f"{name}: empty trace (no header)")
    cols = {h.strip(): i for i, h in enumerate(header)}
    missing = [c for c in ("TIMESTAMP", "ContextTokens", "GeneratedTokens") if c not in cols]
    if missing:
        raise TraceFormatError(f"{name}:1: missing column(s) {', '.join(missing)} (azure-csv header)")
    next_id, t0 = 0, None
    for number, row in enumerate(reader, 2):
        if not row or not any(cell.strip() for cell in row):
            continue
        where = f"{name}:{number}"
        try:
            if len(row) < len(header):
                raise TraceFormatError(f"{where}: expected {len(header)} columns, got {len(row)}")
            t = _parse_azure_time(row[cols["TIMESTAMP"]], where)
            counts = []
            for col in ("ContextTokens", "GeneratedTokens"):
                try:
                    counts.append(int(row[cols[col]]))
                except ValueError:
                    raise TraceFormatError(f"{where}: {col!r} must be an int, got "
                                           f"{row[cols[col]]!r:.20}") from None
            if counts[0] < 1 or counts[1] < 0:
                raise TraceFormatError(f"{where}: token counts must be ContextTokens >= 1 and "
                                       f"GeneratedTokens >= 0, got {counts[0]}, {counts[1]}")
        except TraceFormatError as err:
            trace.skip(err, skip_bad)
            continue
        t0 = t if t0 is None else t0
        n = -(-counts[0] // block_tokens)
        ids = tuple(range(next_id, next_id + n))  # a unique prompt: ids nobody else has
        next_id += n
        trace.requests.append(Request(len(trace.requests), t - t0, counts[0], counts[1], ids, None, None,
                                      block_tokens, number))


def read_trace(path: str | Path, fmt: str | TraceFormat | None = None, skip_bad: bool = False,
               block_tokens: int | None = None) -> Trace:
    """Reads a whole trace file (module docstring).

    Args:
        path: the file (`.gz` is decompressed).
        fmt: the format, or None to detect it.
        skip_bad: count and skip malformed records instead of raising.
        block_tokens: tokens per block of an Azure CSV trace (default 512, as Mooncake).

    Returns:
        The `Trace`, requests in file order.

    Raises:
        TraceFormatError: a malformed record (unless skip_bad), an unreadable or empty file, an
            unknown format.
    """
    p = Path(path)
    if not p.is_file():
        raise TraceFormatError(f"{p}: no such trace file")
    if fmt is None:
        form = detect_format(p)
    else:
        try:
            form = TraceFormat(fmt)
        except ValueError:
            raise TraceFormatError(f"format: {fmt!r}; expected one of "
                                   f"{', '.join(f.value for f in TraceFormat)}") from None
    trace = Trace(str(p), form)
    try:
        with _open_text(p) as f:
            if form is TraceFormat.AZURE_CSV:
                _read_azure(f, p.name, trace, skip_bad, block_tokens or MOONCAKE_BLOCK_TOKENS)
            else:
                _read_jsonl(f, p.name, trace, skip_bad)
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as err:
        raise TraceFormatError(f"{p}: cannot read the trace ({err})") from err
    if not trace.requests:
        raise TraceFormatError(f"{p}: no valid request" + (f" ({trace.skipped} skipped)" if trace.skipped else ""))
    return trace


_DECODE = json.JSONDecoder().raw_decode
_INT = {int}


def _mooncake_fast(record: Any, index: int, number: int, t0: list[float]) -> Request | None:
    """The common well-formed Mooncake record, checked with C-level operations; None: use the slow
    parser (which names what is wrong)."""
    if type(record) is not dict or not t0:
        return None
    ids, ms = record.get("hash_ids"), record.get("timestamp")
    n_in, n_out = record.get("input_length"), record.get("output_length", 0)
    if (type(ids) is list and ids and {*map(type, ids)} == _INT and type(n_in) is int and n_in >= 1
            and type(n_out) is int and n_out >= 0 and type(ms) in (int, float) and 0 <= ms < math.inf):
        return Request(index, (ms - t0[0]) / 1000.0, n_in, n_out, tuple(ids), None, None,
                       MOONCAKE_BLOCK_TOKENS, number)
    return None


def _read_jsonl(f: IO[str], name: str, trace: Trace, skip_bad: bool) -> None:
    mooncake = trace.format is TraceFormat.MOONCAKE
    parse = _mooncake if mooncake else _kvtier
    t0: list[float] = []
    requests = trace.requests
    for number, line in enumerate(f, 1):
        text = line.strip()
        if not text:
            continue
        if mooncake:
            try:
                record, end = _DECODE(text)
            except ValueError:
                record, end = None, -1
            if end == len(text):
                request = _mooncake_fast(record, len(requests), number, t0)
                if request is not None:
                    requests.append(request)
                    continue
        where = f"{name}:{number}"
        try:
            requests.append(parse(_json_record(text, where), len(requests), number, where, t0))
        except TraceFormatError as err:
            trace.skip(err, skip_bad)


def iter_lines(requests: list[Request]) -> Iterator[dict[str, Any]]:
    """Requests as kvtier-format records (what `kvtier gen-trace` prints)."""
    for r in requests:
        record: dict[str, Any] = {"timestamp": round(r.arrival_s, 6), "input_length": r.input_tokens,
                                  "output_length": r.output_tokens, "block_size": r.block_tokens}
        if r.session is not None:
            record["session"] = r.session
        if r.priority:
            record["priority"] = r.priority
        if r.continues is not None:
            record["continues"] = r.continues
        if r.block_ids is not None:
            record["hash_ids"] = list(r.block_ids)
        else:
            record["token_ids"] = list(r.token_ids or ())
        yield record
