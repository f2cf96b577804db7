"""`RequestState`: what the decision half knows of one queued or running request."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvtier.tiers.keys import BlockKey

from kvtier.scheduler.policies import RetentionHint


@dataclass(slots=True)
class RequestState:
    """What the decider knows of one request.

    Attributes:
        protected: blocks it protects in host (its prefix there or on its way there) until its load ends.
        planned_s / started_s: its plan's predicted prefill and when its load started (nan: not yet),
            so the admission knows how much of its prefill is left ahead of the queue.
        predicted: the admission's cached plan of it ((prefix signature), `Plan`).
    """

    request_id: str
    keys: tuple[BlockKey, ...]
    num_tokens: int
    queued_s: float
    protected: set[BlockKey] = field(default_factory=set)
    running: bool = False
    planned_s: float = 0.0
    started_s: float = math.nan
    predicted: tuple[tuple[int, int, int], Any] | None = None
    #: what the engine said about the request's blocks (session, continues, priority), if anything
    hint: RetentionHint | None = None
