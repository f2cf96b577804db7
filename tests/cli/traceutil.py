"""A small Mooncake-format trace for the replay CLI tests."""

from __future__ import annotations

import json


def mooncake_trace(path, n=30):
    """`n` requests: a shared system prompt, 5 conversations, a fresh last block each."""
    lines = []
    for i in range(n):
        ids = [0, 1, 2 + i % 5, 100 + i]  # a shared system prompt, 5 conversations, a fresh last block
        lines.append(json.dumps({"timestamp": i * 200, "input_length": 1800, "output_length": 20, "hash_ids": ids}))
    path.write_text("\n".join(lines) + "\n")
    return path
