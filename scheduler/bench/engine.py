"""`kvtier bench engine`: time to first token of SmolLM2-135M with kvtier, against recomputing and the ideal.

For a prompt of P + S tokens whose first P (2,048) are cached (S = 16 and 64), in one run, each figure
the median of interleaved repeats (A, B, C, ..., A, B, C, ...):
- `recompute`: the whole prompt computed (plain model);
- `host`: the prefix restored from kvtier's host pool, the suffix computed with a per-layer wait;
- `disk`, `disk_zstd`: restored from the disk tier with a truly cold page cache (docs/design.md "Cold page
  cache": every manager and LMDB env on the store closed, data.mdb evicted, residency checked 0,
  then a fresh manager opened, outside the timer);
- `ideal`: the S-token suffix computed on a cache that already holds the P tokens' KV (built before
  the timer: no restore, no clone inside it) — the ceiling no restore can beat;
- `raw_cold_read`: a cold sequential read of a file of the restored bytes, same file system;
- `restore_only_host`, `restore_only_disk`: the load alone (no compute), to see how much of it the
  layer-wise overlap hides: hidden = 1 - (restored TTFT - ideal TTFT) / restore-only time;
- the all-miss overhead: kvtier enabled, nothing cached, P-token unique prompts, against the plain model
  (at least `MISS_REPEATS` pairs, in alternating order).

Each timed region starts after a full garbage collection (as `timeit` keeps the collector out of its
timings): a collection of this process's heap takes ~0.2 s here and would otherwise land in whichever
repeat triggers it.

The restore rows follow a full-restore plan (s = 0, r = every block the exact suffix allows); the
planner's own choice for each tier is reported beside them (`planner`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

SUFFIXES = (16, 64)
#: SmolLM2-135M's geometry (its config.json), for `--model smollm2-135m-random`
SMOLLM2_SHAPE = {"num_layers": 30, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536,
                 "vocab_size": 49152, "max_positions": 8192}


#: repeats of the miss-overhead figure at least: single 10 s prefills swing by a few percent on this machine,
#: the size of the target (3%), so its median needs more of them than the restore figures
MISS_REPEATS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per figure (default 5)")
    parser.add_argument("--prefix-tokens", type=int, default=2048, help="cached prefix tokens P (default 2048)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "smollm2-135m-random", "tiny-random"),
                        help="smollm2-135m (prepared on first use, ~20 s), smollm2-135m-random (random weights in "
                        "SmolLM2-135M's shape: the same times, no checkpoint needed, e.g. on a GPU machine without "
                        "network) or tiny-random (a 4-layer random Llama: "
                        "a smoke test of the harness, not a figure)")
    parser.add_argument("--dir", default=None, help="directory for the disk stores and the cold-read file "
                        "(default: a temp dir under the current directory's file system)")
    parser.add_argument("--device", default="cpu", help="where the model and its KV live: cpu (default) or "
                        "cuda (kvtier's host pool is then pinned and restores cross PCIe)")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvtier.scheduler.bench import common as bu
    from kvtier.scheduler.engines.models import prepare_model

    if args.quick:
        args.repeats, args.prefix_tokens = min(args.repeats, 2), min(args.prefix_tokens, 512)
    if args.repeats < 1 or args.prefix_tokens < 64:
        raise SystemExit(f"kvtier bench engine: --repeats >= 1 and --prefix-tokens >= 64 expected, got "
                         f"{args.repeats} and {args.prefix_tokens}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kvtier bench engine: --device cuda, but torch sees no CUDA device")
    if args.model != "smollm2-135m":
        from kvtier.scheduler.engines.hf.kv import spec_for_model
        from kvtier.scheduler.engines.models import build_random_llama

        model = build_random_llama(seed=0, **(SMOLLM2_SHAPE if args.model == "smollm2-135m-random" else {}))
        spec = spec_for_model(model, "random-0", 64)
        model_id, revision, model_config = spec.model_id, spec.weights_revision, model.config.to_dict()
    else:
        prepared = prepare_model("smollm2-135m")
        model, spec = prepared.load_model(), prepared.spec
        model_id, revision, model_config = prepared.model_id, prepared.weights_revision, None
    model = model.to(device)
    root = tempfile.mkdtemp(prefix=".kvtier-bench-engine-", dir=args.dir or os.getcwd())
    try:
        results = _bench(model, spec, args.prefix_tokens, args.repeats, root, model_config, device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = {"machine": bu.machine(), "model": model_id, "weights_revision": revision,
               "dtype": "float32", "threads": args.threads, "repeats": args.repeats, "device": str(device), **results}
    bu.print_table(results["rows"], ["suffix", "path", "ttft_ms", "ttft_min_ms", "ttft_max_ms", "speedup",
                                     "efficiency"], title=f"kvtier bench engine: {model_id} fp32, "
                   f"{args.threads} threads, {args.prefix_tokens}-token cached prefix")
    for key in ("host_speedup", "disk_speedup", "disk_zstd_speedup", "host_efficiency", "disk_efficiency",
                "disk_zstd_efficiency", "disk_read_overhead", "host_hidden_fraction", "disk_hidden_fraction",
                "miss_overhead", "raw_cold_read_ms", "restore_only_disk_ms", "restore_only_disk_vs_raw",
                "restore_only_disk_vs_raw_max", "restored_mb"):
        print(f"{key}: {results.get(key)}")
    bu.write_json(args.json, results)
    return 0


def _bench(model: Any, spec: Any, P: int, repeats: int, root: str, model_config: Any = None,
           device: Any = "cpu") -> dict[str, Any]:
    import torch

    from kvtier.scheduler.config import OffloadConfig
    from kvtier.scheduler.engines.hf.adapter import HFEngine
    from kvtier.scheduler.engines.hf.kv import HFKVBuffer, max_restorable_blocks
    from kvtier.scheduler.engines.hf.generate import prefill
    from kvtier.scheduler.manager import OffloadManager
    from kvtier.tiers import coldcache
    from kvtier.tiers.disk.store import DiskTier

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (P,), generator=gen)
    suffixes = {S: torch.randint(0, vocab, (S,), generator=gen) for S in SUFFIXES}
    num_blocks = P // spec.block_tokens
    restored_bytes = num_blocks * spec.bytes_per_block
    pool = max(2 * restored_bytes, 256 << 20)

    _, prefix_cache = prefill(model, prefix)
    prefix_kv = HFKVBuffer.from_cache(prefix_cache, spec)
    ideal_kv = HFKVBuffer.allocate(spec, P, device=device)
    for layer in range(spec.num_layers):
        ideal_kv.keys[layer].copy_(prefix_kv.keys[layer])
        ideal_kv.values[layer].copy_(prefix_kv.values[layer])

    host = OffloadManager(spec, OffloadConfig(host_bytes=pool, prefetch=False), model_config=model_config)
    host.store("seed", prefix, prefix_kv)
    host.flush()
    disks = {}
    for name, codec in (("disk", "none"), ("disk_zstd", "zstd")):
        config = OffloadConfig(host_bytes=pool, disk_bytes=pool, disk_path=os.path.join(root, name), codec=codec,
                               prefetch=False)
        with OffloadManager(spec, config, model_config=model_config) as writer:
            writer.store("seed", prefix, prefix_kv)
        disks[name] = config
    raw_file = os.path.join(root, "raw.bin")
    coldcache.write_file(raw_file, restored_bytes)
    del prefix_cache

    def full_restore(prompt_len: int) -> Callable[[Any], Any]:
        cap = min(num_blocks, max_restorable_blocks(prompt_len, spec.block_tokens))
        return lambda plan: dataclasses.replace(plan, split=0, restore_stop=min(cap, plan.num_matched_blocks))

    def ttft(fn: Callable[[], Any]) -> float:
        gc.collect()  # a full collection (~0.2 s here) lands in no timed region (as timeit does it)
        start = time.perf_counter()
        int(torch.argmax(fn()))
        return time.perf_counter() - start

    host_engine = HFEngine(model, host, store=False)
    state: dict[str, Any] = {}

    def cold_disk(name: str) -> HFEngine:
        """The engine on a fresh manager (an empty host tier) whose store's data file is out of the page cache
        (nothing mapped). The engine itself, with its restore buffer, lives on from one repeat to the next, as
        in a server: a cold page cache, not a cold process."""
        old = state.pop("disk_manager", None)
        if old is not None:
            old.close()
        data = DiskTier.data_file_of(disks[name].disk_path)
        left = coldcache.evict_file(data)
        if left:
            raise RuntimeError(f"{data}: {left} bytes still resident after eviction; the cold figure would be warm")
        state["disk_manager"] = manager = OffloadManager(spec, disks[name], model_config=model_config)
        engine = state.setdefault(f"engine-{name}", HFEngine(model, manager, store=False))
        engine.manager = manager
        return engine

    def restore_only(engine: HFEngine) -> float:
        manager = engine.manager
        buffer = HFKVBuffer.allocate(spec, P, device) if "restore_buffer" not in state else state["restore_buffer"]
        state["restore_buffer"] = buffer
        prompt = torch.cat([prefix, suffixes[SUFFIXES[0]]])
        rid = f"restore-only-{time.perf_counter_ns()}"
        manager.enqueue(rid, prompt)
        plan = full_restore(len(prompt))(manager.plan(rid))
        gc.collect()
        start = time.perf_counter()
        loading = manager.load(rid, buffer, plan)
        intact = loading.wait()
        elapsed = time.perf_counter() - start
        manager.finish(rid)
        if intact != plan.num_restored_blocks:
            raise RuntimeError(f"restore-only: {intact} of {plan.num_restored_blocks} blocks intact")
        return elapsed

    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    # warm-up (not recorded): one pass of each path
    for rep in range(-1, repeats):
        for S, suffix in suffixes.items():
            prompt = torch.cat([prefix, suffix])
            full = full_restore(len(prompt))
            t = {}
            t["recompute"] = ttft(lambda: prefill(model, prompt)[0])
            cache = ideal_kv.to_cache()
            t["ideal"] = ttft(lambda: prefill(model, suffix, cache)[0])
            del cache
            t["host"] = ttft(lambda: host_engine.prefill(prompt, plan_fn=full).logits)
            for name in disks:
                engine = cold_disk(name)
                t[name] = ttft(lambda: engine.prefill(prompt, plan_fn=full).logits)
            if rep >= 0:
                for name, seconds in t.items():
                    record(f"{name}@{S}", seconds)
        coldcache.evict_file(raw_file)
        raw = coldcache.cold_sequential_read_s(raw_file)
        host_only = restore_only(host_engine)
        disk_only = restore_only(cold_disk("disk"))
        print(f"bench engine: repeat {rep + 1}/{repeats} done" if rep >= 0 else "bench engine: warm-up done",
              file=sys.stderr, flush=True)
        if rep >= 0:
            record("raw_cold_read", raw)
            record("restore_only_host", host_only)
            record("restore_only_disk", disk_only)

    # planner's own choice (cpu-this-machine profile unless --hardware says otherwise)
    planner = {}
    prompt16 = torch.cat([prefix, suffixes[16]])
    fresh_disk = cold_disk("disk").manager  # nothing restored from it yet: its blocks are on disk only
    for name, manager in (("host", host), ("disk", fresh_disk)):
        plan = manager.plan(f"planner-{name}", prompt16)
        manager.cancel(f"planner-{name}")
        planner[name] = {"split": plan.split, "restore_stop": plan.restore_stop,
                         "matched": plan.num_matched_blocks, "predicted_total_ms": round(plan.total_s * 1e3, 2),
                         "predicted_recompute_ms": round(plan.recompute_all_s * 1e3, 2),
                         "restores": plan.restore_stop > plan.split}
    state.pop("disk_manager").close()
    host.close()

    miss = _miss_overhead(model, spec, P, max(repeats, MISS_REPEATS), pool, model_config)
    return _summarise(times, miss, planner, restored_bytes, repeats)


def _miss_overhead(model: Any, spec: Any, P: int, repeats: int, pool: int, model_config: Any) -> dict[str, Any]:
    """Plain model vs kvtier enabled with nothing cached (unique prompts), interleaved."""
    import torch

    from kvtier.scheduler.bench import common as bu
    from kvtier.scheduler.config import OffloadConfig
    from kvtier.scheduler.engines.hf.adapter import HFEngine
    from kvtier.scheduler.manager import OffloadManager

    gen = torch.Generator().manual_seed(1)
    with OffloadManager(spec, OffloadConfig(host_bytes=pool, prefetch=False), model_config=model_config) as manager:
        engine, plain = HFEngine(model, manager), HFEngine(model)
        plain_s, kvtier_s = [], []
        for rep in range(-1, repeats):
            a, b = (torch.randint(0, model.config.vocab_size, (P,), generator=gen) for _ in range(2))
            t_plain = t_kvtier = 0.0
            for which in ((0, 1) if rep % 2 else (1, 0)):  # A, B then B, A: a drifting load favours neither
                manager.flush()  # the save of b's blocks runs after its first token, outside both timers
                gc.collect()  # as in every timed region: a full collection lands in neither arm
                start = time.perf_counter()
                if which == 0:
                    int(torch.argmax(plain.prefill(a).logits))
                    t_plain = time.perf_counter() - start
                    continue
                result = engine.prefill(b)
                int(torch.argmax(result.logits))
                t_kvtier = time.perf_counter() - start
                if result.restored_tokens:
                    raise RuntimeError("miss overhead: a unique prompt found cached blocks")
                del result  # its cache (94 MB) is not kept alive through the next timed prefill
            manager.flush()
            if rep >= 0:
                plain_s.append(t_plain)
                kvtier_s.append(t_kvtier)
        saved = manager.stats()["saved_blocks"]
    r = bu.ratio(kvtier_s, plain_s)  # kvtier / plain per repeat
    return {"plain_ms": round(bu.median(plain_s) * 1e3, 1), "kvtier_ms": round(bu.median(kvtier_s) * 1e3, 1),
            "overhead": round(r.median - 1, 4), "overhead_min": round(r.low - 1, 4),
            "overhead_max": round(r.high - 1, 4), "saved_blocks": saved, "repeats": len(plain_s)}


def _summarise(times: dict[str, list[float]], miss: dict[str, Any], planner: dict[str, Any], restored_bytes: int,
               repeats: int) -> dict[str, Any]:
    from kvtier.scheduler.bench import common as bu

    med = {name: bu.median(v) for name, v in times.items()}
    spread: dict[str, Any] = {}
    rows = []
    out: dict[str, Any] = {}
    for S in SUFFIXES:
        for path in ("recompute", "ideal", "host", "disk", "disk_zstd"):
            v = times[f"{path}@{S}"]
            speed = bu.ratio(times[f"recompute@{S}"], v)   # recompute / path, per repeat
            eff = bu.ratio(times[f"ideal@{S}"], v)          # ideal / path, per repeat
            rows.append({"suffix": S, "path": path, "ttft_ms": round(med[f"{path}@{S}"] * 1e3, 1),
                         "ttft_min_ms": round(min(v) * 1e3, 1), "ttft_max_ms": round(max(v) * 1e3, 1),
                         "speedup": round(speed.median, 3), "speedup_min": round(speed.low, 3),
                         "speedup_max": round(speed.high, 3), "efficiency": round(eff.median, 3),
                         "efficiency_min": round(eff.low, 3), "efficiency_max": round(eff.high, 3)})
            if path in ("host", "disk", "disk_zstd"):
                tag = "" if S == 16 else f"_s{S}"
                out[f"{path}_speedup{tag}"] = round(speed.median, 3)
                out[f"{path}_efficiency{tag}"] = round(eff.median, 3)
                spread[f"{path}_speedup{tag}"] = {"median": round(speed.median, 3), "min": round(speed.low, 3),
                                                  "max": round(speed.high, 3), "n": len(v)}
                spread[f"{path}_efficiency{tag}"] = {"median": round(eff.median, 3), "min": round(eff.low, 3),
                                                     "max": round(eff.high, 3), "n": len(v)}
    raw = times["raw_cold_read"]
    # per repeat: (disk TTFT - ideal TTFT) / raw cold read, S = 16
    overheads = [(d - i) / r for d, i, r in zip(times["disk@16"], times["ideal@16"], raw)]
    # per repeat: the cold restore alone against the raw cold read of the same bytes (wanted <= 1.5 in each)
    restore_vs_raw = [d / r for d, r in zip(times["restore_only_disk"], raw)]
    spread["disk_read_overhead"] = bu.spread_of(overheads, 3)
    spread["restore_only_disk_vs_raw"] = bu.spread_of(restore_vs_raw, 3)
    spread["miss_overhead"] = {"median": miss["overhead"], "min": miss["overhead_min"], "max": miss["overhead_max"],
                               "n": miss["repeats"]}
    hidden = {}
    for tier in ("host", "disk"):
        fractions = [1 - (t - i) / o for t, i, o in zip(times[f"{tier}@16"], times["ideal@16"],
                                                       times[f"restore_only_{tier}"])]
        hidden[tier] = round(bu.median(fractions), 3)
    out.update({
        "disk_read_overhead": round(bu.median(overheads), 3),
        "disk_read_overhead_min": round(min(overheads), 3), "disk_read_overhead_max": round(max(overheads), 3),
        "miss_overhead": miss["overhead"],
        "host_hidden_fraction": hidden["host"], "disk_hidden_fraction": hidden["disk"],
        "raw_cold_read_ms": round(bu.median(raw) * 1e3, 1),
        "restore_only_host_ms": round(med["restore_only_host"] * 1e3, 1),
        "restore_only_disk_ms": round(med["restore_only_disk"] * 1e3, 1),
        "restore_only_disk_vs_raw": round(bu.median(restore_vs_raw), 3),
        "restore_only_disk_vs_raw_max": round(max(restore_vs_raw), 3),
        "restored_mb": round(restored_bytes / 1e6, 1),
        "ttft_ms": {name: round(v * 1e3, 1) for name, v in med.items()},
        "samples_ms": {name: [round(x * 1e3, 1) for x in v] for name, v in times.items()},
        "miss": miss, "planner": planner, "rows": rows, "spread": spread,
    })
    return out
