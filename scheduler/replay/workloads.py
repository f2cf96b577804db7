"""Built-in workloads: seeded synthetic traces with the prefix sharing real serving traffic has.

Kinds (`KINDS`):
- `chat`: multi-turn chat sessions. Sessions start as a Poisson process and share one system
  prompt; each turn's prompt is the previous prompt + the previous answer + a new user message, so
  it extends the previous turn's prefix. Turns per session are geometric (mean ~3), think time
  exponential (mean 60 s).
- `agents`: a handful of agent types, each with a long system prompt (tools, instructions) shared
  by all its sessions; a session takes several steps, each appending a tool result.
- `docqa`: questions over a corpus of documents with Zipf(1.1) popularity; a prompt is a system
  prompt + one document + a fresh question, so popular documents are shared prefixes.

Every request carries chained block ids (`hash_ids`: equal id, equal prefix; the partial last
block gets an id of its own, as Mooncake's), its lengths, its session, `block_size`, and the retention
hint `continues` an application knows: whether its session sends another request (a chat's last
turn, an agent's final step; a document question never continues).
`generate(kind, num_requests, seed)` is deterministic for a given seed; requests come in arrival
order; `kvtier gen-trace` prints them as kvtier JSONL.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from kvtier.tiers.errors import ConfigError

from kvtier.scheduler.replay.traces import Request

DEFAULT_BLOCK_TOKENS = 64
KINDS = ("chat", "agents", "docqa")


class _Ids:
    """Allocates block ids and builds a prompt's chained ids from shared and private parts."""

    def __init__(self) -> None:
        self.next = 0

    def fresh(self, n: int) -> list[int]:
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def _lognormal_tokens(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))


def _request(ids: _Ids, full: list[int], tokens: int, out: int, t: float, session: str, block: int) -> Request:
    """A request whose prompt is `tokens` long and whose full blocks are (a prefix of) `full`."""
    n_full = tokens // block
    while len(full) < n_full:
        full.extend(ids.fresh(n_full - len(full)))
    block_ids = full[:n_full] + (ids.fresh(1) if tokens % block else [])
    return Request(0, t, tokens, out, tuple(block_ids), None, session, block, 0)


def _chat(rng: random.Random, n: int, block: int) -> list[Request]:
    ids = _Ids()
    system_tokens = 8 * block
    system = ids.fresh(system_tokens // block)
    out: list[Request] = []
    t, session = 0.0, 0
    while len(out) < 2 * n:
        t += rng.expovariate(1.0)  # a new session per second
        session += 1
        full = list(system)
        tokens, now = system_tokens, t
        turns = 1 + int(rng.expovariate(1 / 2.0))
        for _ in range(turns):
            tokens += _lognormal_tokens(rng, 300, 1.0, 8, 8000)  # the user's message
            answer = _lognormal_tokens(rng, 250, 0.8, 1, 2000)
            out.append(_request(ids, full, tokens, answer, now, f"chat-{session}", block))
            tokens += answer
            now += rng.expovariate(1 / 60.0)
    return out


def _agents(rng: random.Random, n: int, block: int) -> list[Request]:
    ids = _Ids()
    kinds = [ids.fresh(rng.randint(32, 96)) for _ in range(6)]  # 2k-6k-token system prompts at 64
    weights = [1.0 / (i + 1) for i in range(len(kinds))]
    out: list[Request] = []
    t, session = 0.0, 0
    while len(out) < 2 * n:
        t += rng.expovariate(0.5)
        session += 1
        system = rng.choices(kinds, weights)[0]
        full = list(system)
        tokens, now = len(system) * block, t
        tokens += _lognormal_tokens(rng, 200, 0.7, 8, 4000)  # the task
        for _ in range(1 + int(rng.expovariate(1 / 4.0))):
            answer = _lognormal_tokens(rng, 120, 0.7, 1, 1000)
            out.append(_request(ids, full, tokens, answer, now, f"agent-{session}", block))
            tokens += answer + _lognormal_tokens(rng, 400, 1.0, 8, 8000)  # the tool call and its result
            now += answer * 0.02 + rng.expovariate(1 / 2.0)
    return out


def _docqa(rng: random.Random, n: int, block: int) -> list[Request]:
    ids = _Ids()
    system = ids.fresh(4)
    num_docs = max(10, n // 5)
    docs = [_lognormal_tokens(rng, 3000, 0.8, 256, 30000) for _ in range(num_docs)]
    doc_blocks: dict[int, list[int]] = {}
    zipf = [1.0 / (i + 1) ** 1.1 for i in range(num_docs)]
    total = sum(zipf)
    cumulative, acc = [], 0.0
    for w in zipf:
        acc += w / total
        cumulative.append(acc)
    out: list[Request] = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(2.0)
        u = rng.random()
        doc = _bisect(cumulative, u)
        # the document's full blocks are shared by every question on it (the prompt is system + doc)
        prefix = doc_blocks.setdefault(doc, list(system) + ids.fresh(docs[doc] // block))
        tokens = (len(system) + docs[doc] // block) * block + _lognormal_tokens(rng, 60, 0.5, 4, 500)
        out.append(_request(ids, list(prefix), tokens, _lognormal_tokens(rng, 150, 0.6, 1, 1000), t,
                            f"doc-{doc}", block))
    return out


def _bisect(cumulative: list[float], u: float) -> int:
    lo, hi = 0, len(cumulative) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cumulative[mid] < u:
            lo = mid + 1
        else:
            hi = mid
    return lo


#: the kinds whose sessions are conversations (the application knows whether one continues)
_CONVERSATIONS = ("chat", "agents")

_GENERATORS: dict[str, Callable[[random.Random, int, int], list[Request]]] = {
    "chat": _chat, "agents": _agents, "docqa": _docqa}


def generate(kind: str, num_requests: int, seed: int = 0, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[Request]:
    """`num_requests` requests of a built-in workload, in arrival order (module docstring).

    Raises:
        ConfigError: an unknown kind, num_requests < 1 or block_tokens < 1.
    """
    if kind not in _GENERATORS:
        raise ConfigError(f"workload: {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(num_requests, int) or num_requests < 1:
        raise ConfigError(f"requests: {num_requests!r}; expected an int >= 1")
    if not isinstance(block_tokens, int) or block_tokens < 1:
        raise ConfigError(f"block_tokens: {block_tokens!r}; expected an int >= 1")
    rng = random.Random(f"{kind}:{seed}")
    reqs = sorted(_GENERATORS[kind](rng, num_requests, block_tokens), key=lambda r: r.arrival_s)[:num_requests]
    continues: list[bool | None] = [None] * len(reqs)
    if kind in _CONVERSATIONS:
        later: set[str | None] = set()
        for i in range(len(reqs) - 1, -1, -1):  # a session continues when it has a later request
            continues[i] = reqs[i].session in later
            later.add(reqs[i].session)
    return [Request(i, round(r.arrival_s, 6), r.input_tokens, r.output_tokens, r.block_ids, None, r.session,
                    r.block_tokens, 0, 0, more) for i, (r, more) in enumerate(zip(reqs, continues))]
