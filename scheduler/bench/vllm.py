"""`kvtier bench vllm`: TTFT of SmolLM2-135M in a real vLLM engine with kvtier, against recomputing and
against vLLM's own ExampleConnector.

In one run on this machine (fp32, vLLM's CPU backend, 128-token blocks), each TTFT the latency of a
max_tokens=1 request, each figure the median of interleaved repeats (A, B, C, D, A, B, C, D, ...):
- for prompts of 512, 2,048 and 3,072 tokens, vLLM's prefix caching off (vLLM cannot serve a repeat
  itself): `none` (no connector: recompute), `kvtier_host` (restored from kvtier's host tier),
  `kvtier_disk` (from its disk tier with a truly cold page cache: before each such repeat
  `llm.reset_prefix_cache(reset_connector=True)` empties kvtier's host tier and makes its worker close
  the LMDB store, evict data.mdb from the page cache and reopen it; a 16-token request ships that order,
  outside the timer; the residency of data.mdb just before the timed request is recorded), and
  `example` (vLLM's ExampleConnector restoring the same prompt from its safetensors files);
- the miss overhead on unique 2,048-token prompts (nothing cached) for kvtier and ExampleConnector,
  against no connector (per round: connector TTFT / none TTFT - 1; median over at least `MISS_REPEATS`
  rounds, the arms' order rotating, `SETTLE_S` between requests so that one engine's background saves
  do not land on another engine's timed request);
- on CUDA (vLLM's CUDA build), `offloading`: vLLM's own `OffloadingConnector` (host memory, CUDA-only)
  restoring the same prompt, a fourth arm beside the others (`vs_offloading_connector` = its TTFT /
  kvtier host's); every engine then takes a fifth of the GPU's memory;
- the multi-turn chat workload: 6 sessions, each a 1,024-token system prompt, 4 turns each adding
  256 user tokens and a fixed 32-token scripted reply, turns round-robin over sessions, prefix caching
  on, `num_gpu_blocks_override=48` (6,144 tokens, less than the sessions need: vLLM's own cache must
  evict); vLLM alone vs vLLM + kvtier, each request run on one engine then the other (interleaved);
  mean and p90 TTFT over turns 2-4;
- the prefetch queue scenario (`bench.vllm_prefetch`, keys `prefetch_*`): cached requests whose prompts
  sit only on a cold disk arrive while the engine is busy and wait in its queue; kvtier with prefetch vs
  `"prefetch": false`. `--only prefetch` runs it alone; `--skip-prefetch` leaves it out;
- `remote_speedup_2k`: a second engine restoring a 2,048-token prompt from kvtier's remote tier (a local
  3-master Redis Cluster) vs recomputing it (`bench.vllm_remote`; skipped without redis-server).

Every engine pins `VLLM_CPU_NUM_OF_RESERVED_CPU=1` (the harness's default) so all arms run on the
same cores (see `harness.EngineConfig.reserved_cpus`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvtier.scheduler.bench import vllm_lmcache

log = logging.getLogger(__name__)

SIZES = (512, 2048, 3072)
#: parts of the benchmark `--only` runs alone
ONLY = ("prefetch",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per figure (default 3)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="prompt sizes in tokens (default "
                        "512,2048,3072)")
    parser.add_argument("--dir", default=None, help="directory for the stores (default: a temp dir under the "
                        "current directory's file system)")
    parser.add_argument("--skip-multiturn", action="store_true", help="leave out the multi-turn workload")
    parser.add_argument("--skip-prefetch", action="store_true", help="leave out the prefetch queue scenario")
    parser.add_argument("--only", choices=ONLY, default=None, help="run one part alone: `prefetch` (the "
                        "queue scenario, keys prefetch_*)")
    vllm_lmcache.add_arguments(parser)
    parser.add_argument("--skip-remote", action="store_true", help="leave out the remote-tier arm (it needs "
                        "redis-server and the `remote` extra; skipped without them)")


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device (then vLLM runs its CUDA build's engines)."""
    import torch

    return torch.cuda.is_available()


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _med(values: list[float]) -> float:
    return statistics.median(values)


#: repeats of the miss-overhead figure at least (its spread between engine instances is a few percent)
MISS_REPEATS = 6
#: seconds between two requests of the miss-overhead figure (background work of the last one settles)
SETTLE_S = 1.0


def run(args: argparse.Namespace) -> int:
    from kvtier.scheduler.bench import common as bu
    from kvtier.scheduler.engines.models import prepare_model
    from kvtier.scheduler.engines.vllm.harness import vllm_available

    if not vllm_available():
        raise SystemExit("kvtier bench vllm: vllm is not installed (the `vllm` extra)")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    repeats = args.repeats
    if args.quick:
        sizes, repeats = (512, 2048), min(repeats, 2)
    if repeats < 1:
        raise SystemExit(f"kvtier bench vllm: --repeats must be >= 1, got {repeats}")
    if "2048" not in map(str, sizes):
        raise SystemExit("kvtier bench vllm: --sizes must include 2048 (the headline figures)")
    model_dir = str(prepare_model("smollm2-135m").path)
    work = Path(tempfile.mkdtemp(prefix="kvtier-bench-vllm-", dir=args.dir or os.getcwd()))
    store = work / "kvtier_store"
    common = {"model_dir": model_dir, "max_model_len": 4096, "kv_cache_gib": 0.5}
    kv_extra = {"host_bytes": "1GiB", "disk_bytes": "4GiB", "disk_path": str(store)}
    result: dict[str, Any] = {"machine": bu.machine(), "model": "smollm2-135m", "dtype": "float32",
                              "repeats": repeats, "sizes": list(sizes)}
    if args.only is None and vllm_lmcache.wanted(args):  # the LMCache arm (docs/peers.md): its server logs outlive `work`
        logs = vllm_lmcache.log_dir(args)
        stem = Path(args.json).stem if args.json else "bench-vllm"
        result["lmcache_logs"] = {k: str(logs / f"{stem}.lmcache-server-{k}.log") for k in ("ttft", "multiturn")}

    try:
        if args.only == "prefetch":
            return _prefetch_only(args, result, repeats, work, common, kv_extra)
        return _run(args, result, sizes, repeats, work, store, common, kv_extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, result: dict[str, Any], sizes: tuple[int, ...], repeats: int, work: Path,
         store: Path, common: dict[str, Any], kv_extra: dict[str, Any]) -> int:
    from kvtier.scheduler.bench import common as bu
    from kvtier.scheduler.engines.vllm.harness import (
        EngineConfig,
        VllmEngine,
        example_connector,
        kvtier_connector,
        offloading_connector,
        random_prompt,
    )
    from kvtier.tiers.coldcache import resident_bytes
    from kvtier.tiers.disk.store import DiskTier

    began = time.perf_counter()
    on_cuda = _cuda_available()
    if on_cuda:  # several engines side by side on one GPU
        common = {**common, "gpu_memory_utilization": 0.2, "reserved_cpus": None}
    result["device"] = "cuda" if on_cuda else "cpu"
    none = VllmEngine(EngineConfig(**common))
    kv = VllmEngine(EngineConfig(**common, **kvtier_connector(**kv_extra)))
    ex = VllmEngine(EngineConfig(**common, **example_connector(work / "example_store")))
    # vLLM's own offloading connector runs on CUDA/XPU only: an arm where the GPU is there
    off = VllmEngine(EngineConfig(**common, **offloading_connector(1 << 30))) if on_cuda else None
    engines = [e for e in (none, kv, ex, off) if e is not None]
    peer = None  # the LMCache arm: its server and settings are LMCache's CPU path (docs/peers.md)
    if "lmcache_logs" in result and not on_cuda:
        peer = vllm_lmcache.LMCacheArm(common, work / "lmcache", Path(result["lmcache_logs"]["ttft"]),
                                       kv_extra["host_bytes"], kv_extra["disk_bytes"])
    flush_seed = [1000]

    def ttft(engine: VllmEngine, prompt: list[int]) -> float:
        return engine.time_request(prompt, max_tokens=1).latency_s

    def make_cold() -> int:
        assert kv.llm.reset_prefix_cache(reset_connector=True), "reset_prefix_cache refused"
        flush_seed[0] += 1
        kv.time_request(random_prompt(16, flush_seed[0]), max_tokens=1)  # ships the cold-reopen order
        return resident_bytes(DiskTier.data_file_of(store))

    try:
        for engine in engines:
            engine.start()
        result["startup_s"] = {"none": none.startup_s, "kvtier": kv.startup_s, "example": ex.startup_s}
        if off is not None:
            result["startup_s"]["offloading"] = off.startup_s
        if peer is not None:
            result["startup_s"]["lmcache"] = peer.start().startup_s
        ttft_rows: dict[str, dict[str, Any]] = {}
        for size in sizes:
            prompt = random_prompt(size, seed=size)
            seeded = [("kvtier", kv), ("example", ex)] + ([("offloading", off)] if off is not None else [])
            outs = {name: eng.time_request(prompt, max_tokens=1).output_ids for name, eng in seeded}  # seeds the stores
            if peer is not None:
                peer.seed(prompt)
            samples: dict[str, list[float]] = {"none": [], "kvtier_host": [], "kvtier_disk": [], "example": []}
            if off is not None:
                samples["offloading"] = []
            resident: list[int] = []
            same_output = True
            for _ in range(repeats):
                samples["none"].append(ttft(none, prompt))
                host = kv.time_request(prompt, max_tokens=1)
                samples["kvtier_host"].append(host.latency_s)
                resident.append(make_cold())
                disk = kv.time_request(prompt, max_tokens=1)
                samples["kvtier_disk"].append(disk.latency_s)
                samples["example"].append(ttft(ex, prompt))
                if off is not None:
                    samples["offloading"].append(ttft(off, prompt))
                same_output &= host.output_ids == disk.output_ids == outs["kvtier"]
                if peer is not None:
                    peer.round(prompt)
            row = {f"{k}_s": round(_med(v), 4) for k, v in samples.items()}
            row.update({f"{k}_samples_s": [round(x, 4) for x in v] for k, v in samples.items()})
            row["host_speedup"] = round(_med([n / h for n, h in zip(samples["none"], samples["kvtier_host"])]), 3)
            row["disk_speedup"] = round(_med([n / d for n, d in zip(samples["none"], samples["kvtier_disk"])]), 3)
            row["vs_example_connector"] = round(_med([e / h for e, h in zip(samples["example"],
                                                                            samples["kvtier_host"])]), 3)
            row["example_speedup"] = round(_med([n / e for n, e in zip(samples["none"], samples["example"])]), 3)
            if off is not None:
                row["vs_offloading_connector"] = round(_med([o / h for o, h in zip(samples["offloading"],
                                                                                   samples["kvtier_host"])]), 3)
            row["disk_resident_bytes_before"] = resident
            row["same_output"] = bool(same_output)
            if peer is not None:
                peer.finish_size(row, none, prompt)
                vllm_lmcache.compare(row, samples)
            ttft_rows[str(size)] = row
            log.info("ttft %d: %s", size, row)
        result["ttft"] = ttft_rows
        two = ttft_rows["2048"]
        s2 = {k: v for k, v in two.items() if k.endswith("_samples_s")}
        for key, num, den in (("host_speedup_2k", "none", "kvtier_host"), ("disk_speedup_2k", "none", "kvtier_disk"),
                              ("vs_example_connector_2k", "example", "kvtier_host")):
            bu.note_spread(result, key, [n / d for n, d in zip(s2[f"{num}_samples_s"], s2[f"{den}_samples_s"])], 3)
        result["host_speedup_2k"] = two["host_speedup"]
        result["disk_speedup_2k"] = two["disk_speedup"]
        result["vs_example_connector_2k"] = two["vs_example_connector"]
        if off is not None:
            result["vs_offloading_connector_2k"] = two["vs_offloading_connector"]

        # unique prompts; the arms' order rotates from repeat to repeat and each request starts after the
        # previous engine's background work (kvtier's write-through of the last prompt, say) has settled,
        # so no arm pays for another engine's saves on this 2-core machine
        arms = [("none", none), ("kvtier", kv), ("example", ex)] + ([("lmcache", peer.engine)] if peer else [])
        miss: dict[str, list[float]] = {name: [] for name, _ in arms}
        for r in range(max(repeats, MISS_REPEATS)):
            for i, (name, eng) in enumerate(arms[r % len(arms):] + arms[:r % len(arms)]):
                time.sleep(SETTLE_S)
                miss[name].append(ttft(eng, random_prompt(2048, seed=50_000 + 10 * r + i)))
        over_kv = [k / n - 1 for k, n in zip(miss["kvtier"], miss["none"])]
        over_ex = [e / n - 1 for e, n in zip(miss["example"], miss["none"])]
        result["miss"] = {f"{k}_samples_s": [round(x, 4) for x in v] for k, v in miss.items()}
        result["miss_overhead"] = round(_med(over_kv), 4)
        bu.note_spread(result, "miss_overhead", over_kv)
        result["miss_overhead_example"] = round(_med(over_ex), 4)
        if peer is not None:  # LMCache's and kvtier's miss overhead at every size (2,048: the rounds above)
            by_size = {"2048": {k: vllm_lmcache.overhead(miss, k) for k in ("kvtier", "lmcache")}}
            for size in (s for s in sizes if s != 2048):
                got = vllm_lmcache.miss_rounds([("none", none), ("kvtier", kv), ("lmcache", peer.engine)], size,
                                               repeats, seed=70_000 + size)
                by_size[str(size)] = {k: vllm_lmcache.overhead(got, k) for k in ("kvtier", "lmcache")}
            result["miss_overhead_by_size"] = by_size
            result["miss_overhead_lmcache"] = by_size["2048"]["lmcache"]
    finally:
        for engine in engines:
            engine.close()
        if peer is not None:
            peer.close()

    if not args.skip_prefetch:
        _prefetch_into(result, common, kv_extra, work, repeats)
    # a second engine restoring a 2k prompt from the remote tier (bench.vllm_remote) vs recompute
    from kvtier.scheduler.bench import vllm_remote as bench_vllm_remote

    if not args.skip_remote and bench_vllm_remote.redis_available():
        shared = {k: v for k, v in kv_extra.items() if k != "disk_path"}
        result["remote"] = bench_vllm_remote.remote_speedup(common, shared, work, repeats)
        result["remote_speedup_2k"] = result["remote"]["speedup"]
    if not args.skip_multiturn:
        mt_peer = None
        if peer is not None:
            mt_peer = vllm_lmcache.LMCacheArm(
                dict(common, enable_prefix_caching=True, num_gpu_blocks_override=48), work / "lmcache_mt",
                Path(result["lmcache_logs"]["multiturn"]), kv_extra["host_bytes"], kv_extra["disk_bytes"])
        result["multiturn"] = _multiturn(common, kv_extra | {"disk_path": str(work / "kvtier_mt_store")},
                                         EngineConfig, VllmEngine, kvtier_connector, random_prompt, mt_peer)
        result["multiturn_ttft_speedup"] = result["multiturn"]["speedup_mean"]
        # one figure of means over 18 requests an arm: its spread is that of the per-turn mean ratios
        mt_turns = result["multiturn"]
        bu.note_spread(result, "multiturn_ttft_speedup", [v / k for v, k in zip(mt_turns["vllm_turn_means_s"][1:],
                                                                                mt_turns["kvtier_turn_means_s"][1:])], 3)
    if peer is not None:
        vllm_lmcache.summarize(result)
    result["elapsed_s"] = round(time.perf_counter() - began, 1)

    rows = [{"prompt": k, **{c: v[c] for c in ("none_s", "kvtier_host_s", "kvtier_disk_s", "example_s",
                                                 "host_speedup", "disk_speedup", "vs_example_connector")}}
            for k, v in result["ttft"].items()]
    bu.print_table(rows, list(rows[0]), "TTFT (s), vLLM prefix caching off, median of interleaved repeats")
    if peer is not None:
        rows = [{"prompt": k, **{c: v[c] for c in ("floor_s", "kvtier_host_s", "lmcache_host_s", "vs_lmcache_host",
                                                     "kvtier_disk_s", "lmcache_disk_s", "vs_lmcache_disk")},
                 **{f"miss_{a}": result["miss_overhead_by_size"][k][a] for a in ("kvtier", "lmcache")}}
                for k, v in result["ttft"].items()]
        bu.print_table(rows, list(rows[0]), "kvtier vs LMCache (multiprocess mode), TTFT (s), medians")
    for key in ("host_speedup_2k", "disk_speedup_2k", "vs_example_connector_2k", "miss_overhead",
                "miss_overhead_example", "vs_offloading_connector_2k", "remote_speedup_2k", "multiturn_ttft_speedup",
                "vs_lmcache_host_2k", "vs_lmcache_disk_2k", "vs_lmcache_host_bound_2k", "vs_lmcache_disk_bound_2k",
                "kvtier_host_vs_floor_2k", "vs_lmcache_multiturn", "vs_lmcache_multiturn_bound",
                "lmcache_outputs_match") + PREFETCH_KEYS:
        print(f"{key}: {result.get(key)}")
    bu.write_json(args.json, result)
    return 0


PREFETCH_KEYS = ("prefetch_coverage", "prefetch_ttft_speedup", "prefetch_prefill_speedup", "prefetch_queue_share_off",
                 "prefetch_ttft_speedup_bound", "prefetch_ttft_speedup_same_queue", "prefetch_ttft_on_s",
                 "prefetch_ttft_off_s", "prefetch_outputs_match")


def _prefetch_into(result: dict[str, Any], common: dict[str, Any], kv_extra: dict[str, Any], work: Path,
                   repeats: int) -> None:
    """Runs the prefetch queue scenario (`bench.vllm_prefetch`) and merges its figures into `result`."""
    from kvtier.scheduler.bench import vllm_prefetch

    got = vllm_prefetch.run_scenario(common, {k: v for k, v in kv_extra.items() if k != "disk_path"}, work, repeats)
    result.setdefault("spread", {}).update(got.pop("spread", {}))
    result.update(got)


def _prefetch_only(args: argparse.Namespace, result: dict[str, Any], repeats: int, work: Path,
                   common: dict[str, Any], kv_extra: dict[str, Any]) -> int:
    from kvtier.scheduler.bench import common as bu

    began = time.perf_counter()
    result["device"] = "cuda" if _cuda_available() else "cpu"
    _prefetch_into(result, common, kv_extra, work, repeats)
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    for key in PREFETCH_KEYS:
        print(f"{key}: {result.get(key)}  {result.get('spread', {}).get(key, '')}")
    bu.write_json(args.json, result)
    return 0


def _multiturn(common: dict[str, Any], kv_extra: dict[str, Any], EngineConfig: Any, VllmEngine: Any,
               kvtier_connector: Any, random_prompt: Any, peer: Any = None) -> dict[str, Any]:
    """6 sessions x 4 turns round-robin on vLLM alone and vLLM + kvtier (prefix caching on, 48 blocks);
    with `peer` (an unstarted `vllm_lmcache.LMCacheArm`), on vLLM + LMCache too."""
    mt = dict(common, enable_prefix_caching=True, num_gpu_blocks_override=48)
    sessions = [random_prompt(1024, seed=900 + s) for s in range(6)]
    turns = 4
    users = [[random_prompt(256, seed=2000 + 10 * s + t) for t in range(turns)] for s in range(6)]
    replies = [[random_prompt(32, seed=5000 + 10 * s + t) for t in range(turns)] for s in range(6)]
    times: dict[str, list[list[float]]] = {k: [[] for _ in range(turns)] for k in
                                           ("vllm", "kvtier") + (("lmcache",) if peer is not None else ())}
    alone = VllmEngine(EngineConfig(**mt))
    withkv = VllmEngine(EngineConfig(**mt, **kvtier_connector(**kv_extra)))
    try:
        alone.start()
        withkv.start()
        if peer is not None:
            peer.start()
        history = [list(s) for s in sessions]
        for t in range(turns):
            for s in range(6):
                prompt = history[s] + users[s][t]
                times["vllm"][t].append(alone.time_request(prompt, max_tokens=1).latency_s)
                times["kvtier"][t].append(withkv.time_request(prompt, max_tokens=1).latency_s)
                if peer is not None:
                    times["lmcache"][t].append(peer.engine.time_request(prompt, max_tokens=1).latency_s)
                history[s] = prompt + replies[s][t]
    finally:
        alone.close()
        withkv.close()
        if peer is not None:
            peer.close()
    if peer is not None:  # the bound of any connector's ratio to LMCache: restores that cost nothing
        times["ideal"] = _multiturn_ideal(dict(common, enable_prefix_caching=True, kv_cache_gib=1.0), VllmEngine,
                                          EngineConfig, sessions, users, replies)
    later = {k: [x for turn in v[1:] for x in turn] for k, v in times.items()}
    out: dict[str, Any] = {"sessions": 6, "turns": turns, "system_tokens": 1024, "user_tokens": 256,
                           "reply_tokens": 32, "num_gpu_blocks_override": 48}
    for k, v in later.items():
        out[f"{k}_mean_s"] = round(statistics.fmean(v), 4)
        out[f"{k}_p90_s"] = round(_p90(v), 4)
        out[f"{k}_turn_means_s"] = [round(statistics.fmean(turn), 4) for turn in times[k]]
    if "ideal_mean_s" in out:
        out["lmcache_vs_ideal"] = round(out["lmcache_mean_s"] / out["ideal_mean_s"], 3)
        out["kvtier_vs_ideal"] = round(out["kvtier_mean_s"] / out["ideal_mean_s"], 3)
    out["speedup_mean"] = round(out["vllm_mean_s"] / out["kvtier_mean_s"], 3)
    out["speedup_p90"] = round(out["vllm_p90_s"] / out["kvtier_p90_s"], 3)
    return out


def _multiturn_ideal(config: dict[str, Any], VllmEngine: Any, EngineConfig: Any, sessions: list[list[int]],
                     users: list[list[list[int]]], replies: list[list[list[int]]]) -> list[list[float]]:
    """The multi-turn requests on vLLM alone with room for every session's history (1 GiB of KV, nothing
    evicted): each turn's TTFT is then the prefill of its new tokens (reply and user) and the engine's step,
    with no restore at all, the floor under every connector. Run after the other engines closed (memory),
    so not interleaved with them."""
    times: list[list[float]] = [[] for _ in users[0]]
    with VllmEngine(EngineConfig(**config)) as ideal:
        history = [list(s) for s in sessions]
        for t in range(len(users[0])):
            for s in range(len(sessions)):
                prompt = history[s] + users[s][t]
                times[t].append(ideal.time_request(prompt, max_tokens=1).latency_s)
                history[s] = prompt + replies[s][t]
    return times
