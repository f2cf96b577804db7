"""Trace parsing: good and bad records of each format, gzip, detection, skip-bad; built-in workloads."""

from __future__ import annotations

import gzip
import json

import pytest

from kvtier.scheduler.replay import traces, workloads
from kvtier.scheduler.replay.traces import Request, TraceFormat, block_weights, detect_format, read_trace
from kvtier.tiers.errors import ConfigError, TraceFormatError

MOONCAKE = [
    {"timestamp": 1000, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
    {"timestamp": 3500, "input_length": 600, "output_length": 0, "hash_ids": [0, 7]},
]


def write_lines(path, lines, gz=False):
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_mooncake_good(tmp_path, gz):
    path = write_lines(tmp_path / ("t.jsonl.gz" if gz else "t.jsonl"), MOONCAKE + [""], gz)
    trace = read_trace(path)
    assert trace.format is TraceFormat.MOONCAKE and trace.skipped == 0
    first, second = trace.requests
    assert first == Request(0, 0.0, 1100, 5, (0, 1, 2), None, None, 512, 1)
    assert second.arrival_s == 2.5 and second.block_ids == (0, 7) and second.line == 2
    assert block_weights(first.input_tokens, 3, 512) == [512, 512, 76]


@pytest.mark.parametrize("line, message", [
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": "abc"}',
     "t.jsonl:2: 'hash_ids' must be a list of ints, got str"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, "x"]}',
     "t.jsonl:2: 'hash_ids' must be a list of ints, got an element of type str"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "t.jsonl:2: missing 'hash_ids'"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}',
     "t.jsonl:2: 'input_length' must be >= 1, got 0"),
    ('{"timestamp": -4, "input_length": 10, "hash_ids": [1]}', "t.jsonl:2: 'timestamp' must be a number >= 0"),
    ('{"timestamp": 0, "input_length": 10, "hash_ids": []}', "t.jsonl:2: 'hash_ids' is empty"),
    ('{"timestamp": 0, "input_length": 10, "hash_ids": [1]', r"t.jsonl:2: not JSON \("),
    ("[1, 2]", "t.jsonl:2: expected a JSON object, got list"),
])
def test_mooncake_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "t.jsonl", [MOONCAKE[0], line, MOONCAKE[1]])
    with pytest.raises(TraceFormatError, match=message):
        read_trace(path, "mooncake")
    trace = read_trace(path, "mooncake", skip_bad=True)
    assert trace.skipped == 1 and len(trace.requests) == 2
    assert trace.errors and trace.errors[0].startswith("t.jsonl:2:")


def test_kvtier_format_hash_and_token_ids(tmp_path):
    lines = [
        {"timestamp": 10.0, "session_id": "s1", "input_length": 40, "output_length": 3, "hash_ids": [5, 6, 7],
         "block_size": 16},
        {"timestamp": 10.5, "token_ids": list(range(40)), "output_length": 2, "block_size": 16},
    ]
    path = write_lines(tmp_path / "k.jsonl.gz", lines, gz=True)
    assert detect_format(path) is TraceFormat.KVTIER
    a, b = read_trace(path).requests
    assert (a.session, a.block_tokens, a.block_ids, a.arrival_s) == ("s1", 16, (5, 6, 7), 0.0)
    assert b.block_ids is None and b.token_ids == tuple(range(40)) and b.input_tokens == 40
    assert b.num_blocks == 3 and b.arrival_s == 0.5
    assert (a.priority, a.continues) == (0, None)


def test_kvtier_format_retention_hints(tmp_path):
    lines = [{"timestamp": 0, "session": "s7", "input_length": 40, "hash_ids": [5, 6, 7], "priority": -2,
              "continues": False}]
    (r,) = read_trace(write_lines(tmp_path / "h.jsonl", lines)).requests  # `session` alone: kvtier format
    assert (r.session, r.priority, r.continues) == ("s7", -2, False)
    assert list(traces.iter_lines([r]))[0] | {"priority": -2, "continues": False} == list(traces.iter_lines([r]))[0]


@pytest.mark.parametrize("record, message", [
    ({"timestamp": 0, "input_length": 4, "hash_ids": [1], "token_ids": [1], "block_size": 4},
     "exactly one of 'hash_ids' and 'token_ids'"),
    ({"timestamp": 0, "input_length": 4, "hash_ids": [1], "block_size": 0}, "'block_size' must be an int >= 1, got 0"),
    ({"timestamp": 0, "token_ids": [1, 2.5], "block_size": 4}, "'token_ids' must be a list of ints"),
    ({"timestamp": "soon", "hash_ids": [1], "input_length": 3, "block_size": 4}, "'timestamp' must be a number"),
    ({"timestamp": 0, "hash_ids": [1], "input_length": 3, "session": "s", "priority": "high"},
     "'priority' must be an int, got 'high'"),
    ({"timestamp": 0, "hash_ids": [1], "input_length": 3, "session": "s", "continues": 1},
     "'continues' must be true or false, got 1"),
])
def test_kvtier_bad_records(tmp_path, record, message):
    path = write_lines(tmp_path / "k.jsonl", [record])
    with pytest.raises(TraceFormatError, match=f"k.jsonl:1: .*{message}"):
        read_trace(path, "kvtier")


AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,1200,30\n2023-11-16 18:15:47.1805900,100,5\n"


@pytest.mark.parametrize("gz", [False, True])
def test_azure_csv_unique_prompts(tmp_path, gz):
    path = tmp_path / ("a.csv.gz" if gz else "a.csv")
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(AZURE)
    else:
        path.write_text(AZURE)
    trace = read_trace(path)
    assert trace.format is TraceFormat.AZURE_CSV
    a, b = trace.requests
    assert a.block_ids == (0, 1, 2) and b.block_ids == (3,)  # fresh ids: nothing shared
    assert (a.input_tokens, a.output_tokens, b.output_tokens) == (1200, 30, 5)
    assert b.arrival_s == pytest.approx(0.5)


@pytest.mark.parametrize("row, message", [
    ("2023-11-16 18:15:46,abc,3", "a.csv:3: 'ContextTokens' must be an int, got 'abc'"),
    ("yesterday,12,3", "a.csv:3: 'TIMESTAMP' must be a time"),
    ("2023-11-16 18:15:46,12", "a.csv:3: expected 3 columns, got 2"),
    ("2023-11-16 18:15:46,0,3", "a.csv:3: token counts must be"),
])
def test_azure_csv_bad_rows(tmp_path, row, message):
    path = tmp_path / "a.csv"
    path.write_text(AZURE.splitlines()[0] + "\n" + AZURE.splitlines()[1] + "\n" + row + "\n")
    with pytest.raises(TraceFormatError, match=message):
        read_trace(path)
    assert read_trace(path, skip_bad=True).skipped == 1


def test_file_level_errors(tmp_path):
    with pytest.raises(TraceFormatError, match="no such trace file"):
        read_trace(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TraceFormatError, match="empty trace"):
        read_trace(empty)
    bad_gz = tmp_path / "x.jsonl.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(TraceFormatError, match="cannot read the trace"):
        read_trace(bad_gz)
    with pytest.raises(TraceFormatError, match="format: 'parquet'"):
        read_trace(write_lines(tmp_path / "t.jsonl", MOONCAKE), "parquet")
    only_bad = write_lines(tmp_path / "bad.jsonl", ["{}"])
    with pytest.raises(TraceFormatError, match=r"no valid request \(1 skipped\)"):
        read_trace(only_bad, "mooncake", skip_bad=True)
    header_only = tmp_path / "h.csv"
    header_only.write_text("TIMESTAMP,Tokens\n1,2\n")
    with pytest.raises(TraceFormatError, match="missing column"):
        read_trace(header_only)


@pytest.mark.parametrize("kind", workloads.KINDS)
def test_workloads_are_seeded_and_share_prefixes(tmp_path, kind):
    a = workloads.generate(kind, 300, seed=7)
    assert a == workloads.generate(kind, 300, seed=7)
    assert a != workloads.generate(kind, 300, seed=8)
    assert len(a) == 300 and all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))
    assert all(r.num_blocks == -(-r.input_tokens // r.block_tokens) for r in a)
    firsts = [r.block_ids[0] for r in a]
    assert len(set(firsts)) < len(firsts)  # a shared system prompt or document
    # round trip through kvtier JSONL
    path = write_lines(tmp_path / "w.jsonl", list(traces.iter_lines(a)))
    back = read_trace(path).requests
    assert [r.block_ids for r in back] == [r.block_ids for r in a]
    assert [r.session for r in back] == [r.session for r in a]
    assert [r.continues for r in back] == [r.continues for r in a]
    if kind == "docqa":
        assert all(r.continues is None for r in a)  # a question does not say whether its document returns
    else:  # a session's last request does not continue, every earlier one does
        last = {r.session: i for i, r in enumerate(a)}
        assert all(r.continues == (last[r.session] != i) for i, r in enumerate(a))


def test_workload_bad_arguments():
    with pytest.raises(ConfigError, match="workload: 'poker'"):
        workloads.generate("poker", 10)
    with pytest.raises(ConfigError, match="requests: 0"):
        workloads.generate("chat", 0)
