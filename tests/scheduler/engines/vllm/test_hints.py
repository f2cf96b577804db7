"""The scheduler side reads retention hints from a vLLM request's `kv_transfer_params`."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from kvtier.scheduler.engines.vllm.scheduler_side import request_hint  # noqa: E402
from kvtier.scheduler.policies import RetentionHint  # noqa: E402


def test_hint_from_kv_transfer_params():
    request = SimpleNamespace(request_id="r1", kv_transfer_params={"session": "conv-7", "continues": False})
    assert request_hint(request) == RetentionHint("conv-7", False, 0)
    assert request_hint(SimpleNamespace(request_id="r2", kv_transfer_params=None)) is None
    assert request_hint(SimpleNamespace(request_id="r3")) is None  # an older vLLM without the field


def test_malformed_hint_is_ignored_not_fatal(caplog):
    request = SimpleNamespace(request_id="r4", kv_transfer_params={"priority": "high"})
    with caplog.at_level(logging.WARNING):
        assert request_hint(request) is None
    assert "r4" in caplog.text and "priority: 'high'; expected an int" in caplog.text
