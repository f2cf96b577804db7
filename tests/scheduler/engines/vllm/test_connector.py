"""kvtier's vLLM connector in a real vLLM engine: exact greedy outputs from host, from disk, after a
restart, with a partly cached prefix, a corrupted disk value, concurrent requests and an abort.

One module, three engines in turn (starting one costs 30-60 s here): a reference engine without any
connector computes every prompt's greedy output first and is closed; then the kvtier engine serves
the tests in file order; the last test restarts it on the same disk store. vLLM's own prefix cache is
off, so a repeated prompt can be served only by the connector (`num_cached_tokens` says how much it
served). `llm.reset_prefix_cache(reset_connector=True)` empties kvtier's host tier and reopens its
disk store cold, so the next restore comes from disk.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvtier.scheduler.engines.vllm.harness import (
    CPU_BLOCK_TOKENS,
    EngineConfig,
    VllmEngine,
    kvtier_connector,
    random_prompt,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

B = CPU_BLOCK_TOKENS
MAX_TOKENS = 4
_PREFIX = random_prompt(2 * B, seed=70)
PROMPTS: dict[str, list[int]] = {
    "host": random_prompt(3 * B + 50, seed=71),
    "aligned": random_prompt(4 * B, seed=72),
    "disk": random_prompt(3 * B + 20, seed=73),
    "part1": _PREFIX + random_prompt(B + 30, seed=74),
    "part2": _PREFIX + random_prompt(B + 60, seed=75),
    "corrupt": random_prompt(3 * B + 10, seed=76),
    "abort": random_prompt(3 * B + 5, seed=77),
    "conc1": _PREFIX + random_prompt(70, seed=78),
    "conc2": _PREFIX + random_prompt(90, seed=79),
}
COMMON = {"max_model_len": 2048, "kv_cache_gib": 0.5}
_FLUSH_SEEDS = itertools.count(1000)


class Engines:
    """The module's reference outputs and its current kvtier engine (restartable)."""

    def __init__(self, model_dir: Path, store: Path) -> None:
        self.model_dir = str(model_dir)
        self.store = store
        self.reference: dict[str, tuple[int, ...]] = {}
        self.engine: VllmEngine | None = None

    def config(self) -> EngineConfig:
        extra = {"host_bytes": "256MiB", "disk_bytes": "1GiB", "disk_path": str(self.store)}
        return EngineConfig(model_dir=self.model_dir, **COMMON, **kvtier_connector(**extra))

    def start(self) -> VllmEngine:
        self.engine = VllmEngine(self.config()).start()
        return self.engine

    def restart(self) -> VllmEngine:
        self.close()
        return self.start()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


@pytest.fixture(scope="module")
def engines(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    box = Engines(vllm_model_dir, tmp_path_factory.mktemp("kvtier_vllm") / "store")
    names = list(PROMPTS)
    with VllmEngine(EngineConfig(model_dir=str(vllm_model_dir), **COMMON)) as plain:
        results = plain.generate([PROMPTS[n] for n in names], max_tokens=MAX_TOKENS)
    box.reference = {n: r.output_ids for n, r in zip(names, results)}
    box.start()
    try:
        yield box
    finally:
        box.close()


def run(engine: VllmEngine, name: str) -> tuple[tuple[int, ...], int]:
    result = engine.generate([PROMPTS[name]], max_tokens=MAX_TOKENS)[0]
    return result.output_ids, result.num_cached_tokens or 0


def drop_host(engine: VllmEngine) -> None:
    """Empties kvtier's host tier and reopens its disk store cold; a short request ships the order."""
    assert engine.llm.reset_prefix_cache(reset_connector=True)
    engine.generate([random_prompt(16, seed=next(_FLUSH_SEEDS))], max_tokens=1)


def test_restored_from_host_gives_the_same_output(engines: Engines) -> None:
    engine, ref = engines.engine, engines.reference
    assert run(engine, "host") == (ref["host"], 0)
    assert run(engine, "host") == (ref["host"], 3 * B)


def test_a_fully_cached_prompt_recomputes_only_its_last_token(engines: Engines) -> None:
    engine, ref = engines.engine, engines.reference
    assert run(engine, "aligned") == (ref["aligned"], 0)
    assert run(engine, "aligned") == (ref["aligned"], 4 * B - 1)


def test_restored_from_disk_gives_the_same_output(engines: Engines) -> None:
    engine, ref = engines.engine, engines.reference
    assert run(engine, "disk") == (ref["disk"], 0)
    drop_host(engine)
    assert run(engine, "disk") == (ref["disk"], 3 * B)


def test_a_partly_cached_prefix_is_restored_and_the_rest_computed(engines: Engines) -> None:
    engine, ref = engines.engine, engines.reference
    assert run(engine, "part1") == (ref["part1"], 0)
    assert run(engine, "part2") == (ref["part2"], 2 * B)


def test_a_corrupted_disk_value_is_recomputed(engines: Engines) -> None:
    import lmdb

    from kvtier.tiers.disk import env as diskenv
    from kvtier.tiers.disk.format import HEADER_BYTES, lmdb_key
    from kvtier.tiers.keys import KeyChain

    engine, ref = engines.engine, engines.reference
    assert run(engine, "corrupt") == (ref["corrupt"], 0)
    drop_host(engine)  # the blocks are now on disk only
    spec = _spec(engines)
    keys = KeyChain.for_spec(spec).keys(PROMPTS["corrupt"])
    env = lmdb.open(str(engines.store), max_dbs=4, map_size=1 << 30)
    try:
        db = env.open_db(diskenv.BLOCKS_DB, create=False)
        with env.begin(write=True, db=db) as txn:
            lk = lmdb_key(spec.fingerprint_bytes, keys[1])
            value = bytearray(txn.get(lk))
            value[HEADER_BYTES + 1000] ^= 0xFF
            txn.put(lk, bytes(value))
    finally:
        env.close()
    # the request finds the engine idle (nothing to wait behind: no promotion), so its load reads the 3
    # blocks from disk itself; block 1 fails its checksum there and vLLM recomputes from it: the same
    # output (vLLM counts the 3 promised blocks as cached)
    assert run(engine, "corrupt") == (ref["corrupt"], 3 * B)
    # block 1 is forgotten: the next request restores block 0 only and computes (and saves) the rest
    assert run(engine, "corrupt") == (ref["corrupt"], B)
    assert run(engine, "corrupt") == (ref["corrupt"], 3 * B)  # saved again, intact


def test_two_concurrent_requests_sharing_a_cached_prefix(engines: Engines) -> None:
    engine, ref = engines.engine, engines.reference
    results = engine.generate([PROMPTS["conc1"], PROMPTS["conc2"]], max_tokens=MAX_TOKENS)
    assert [r.output_ids for r in results] == [ref["conc1"], ref["conc2"]]
    assert [r.num_cached_tokens for r in results] == [2 * B, 2 * B]  # the prefix from the partial test


def test_a_request_aborted_while_its_prefetch_is_in_flight(engines: Engines) -> None:
    from vllm import SamplingParams

    engine, ref = engines.engine, engines.reference
    assert run(engine, "abort") == (ref["abort"], 0)
    drop_host(engine)  # on disk only: a new request for it waits for its disk -> host promotion
    core = engine.llm.llm_engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    core.add_request("aborted-1", {"prompt_token_ids": PROMPTS["abort"]}, params)
    core.abort_request(["aborted-1"])
    deadline = time.monotonic() + 60
    while core.has_unfinished_requests() and time.monotonic() < deadline:
        core.step()
    assert not core.has_unfinished_requests()
    assert run(engine, "abort") == (ref["abort"], 3 * B)  # the engine and the books are sound


def test_blocks_on_disk_are_restored_after_an_engine_restart(engines: Engines) -> None:
    engine = engines.restart()
    ref = engines.reference
    assert run(engine, "disk") == (ref["disk"], 3 * B)
    assert run(engine, "host") == (ref["host"], 3 * B)


def _spec(engines: Engines) -> Any:
    from kvtier.tiers.spec import KVSpec

    import torch

    from kvtier.scheduler.engines.vllm.buffer import LAYOUT_FORMAT, _attn_isa, weights_revision

    revision, model_id = weights_revision(engines.model_dir)
    hf = json.loads((Path(engines.model_dir) / "config.json").read_text())
    isa = _attn_isa(torch.float32, B, 64)
    return KVSpec.from_hf_config(hf, model_id=model_id, weights_revision=revision, dtype="float32",
                                 block_tokens=B, layout=LAYOUT_FORMAT.format(device="cpu", isa=isa))
