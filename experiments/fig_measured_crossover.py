"""Figure 2: restore vs recompute measured on this machine with real tiers and a real model, beside the
cost model's prediction for the same points.

Model: SmolLM2-135M-Instruct in fp32 (`kvtier models prepare smollm2-135m`), eager attention, 2 threads,
64-token blocks. For each prefix length P in 512 ... 8192 tokens (the model's context is 8k):
- recompute: a prefill of P random tokens (`kv.prefill`); median of 2 up to 1k tokens, one run from 2k
  to 8k (they take minutes on 2 shared cores);
- restore from host: the first P tokens of KV loaded from a kvtier `HostTier` into an `HFKVBuffer` through
  `OffloadManager.load` (the real Transferer path), timed to `Loading.wait()`; median of 5 after a warm-up;
- restore from disk, cold: the same load from a `DiskTier` (LMDB, no codec) whose data file was evicted
  from the page cache (`coldcache.evict_file`) with every store closed, through a freshly opened manager;
  median of 3, each cold.
The KV stored is the 8k prefill's own cache (a prefix of a causal cache is the prefix's cache).

Predictions: `CostModel.recompute_s(0, P)` and `restore_tokens_s('host' | 'disk', P)` of this machine's
calibrated cost model (`kvtier calibrate --model smollm2-135m --out PATH`; `--profile PATH`, default
$KVTIER_PROFILE or /tmp/cal/profile.json when present) and, dashed, of the built-in `cpu-this-machine`
profile that an uncalibrated OffloadManager uses.

Writes experiments/out/fig_measured_crossover.{csv,json,png}; prints the findings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import out_path, pyplot, write_csv, write_json  # noqa: E402

import torch  # noqa: E402

from kvtier.scheduler.bench.common import machine  # noqa: E402
from kvtier.scheduler.config import OffloadConfig  # noqa: E402
from kvtier.scheduler.cost.model import CostModel  # noqa: E402
from kvtier.scheduler.engines.hf.kv import HFKVBuffer  # noqa: E402
from kvtier.scheduler.engines.hf.generate import prefill  # noqa: E402
from kvtier.scheduler.engines.models import prepare_model  # noqa: E402
from kvtier.scheduler.manager import OffloadManager  # noqa: E402
from kvtier.tiers import coldcache  # noqa: E402
from kvtier.tiers.disk.store import DiskTier  # noqa: E402

LENGTHS = (512, 1024, 2048, 4096, 8192)
HOST_REPEATS, DISK_REPEATS = 5, 3


def recompute_repeats(P: int) -> int:
    return 2 if P <= 1024 else 1


def timed_prefill(model: Any, ids: torch.Tensor) -> tuple[float, Any]:
    start = time.perf_counter()
    logits, cache = prefill(model, ids)
    int(torch.argmax(logits))
    return time.perf_counter() - start, cache


def timed_load(manager: OffloadManager, ids: torch.Tensor, buffer: HFKVBuffer, rid: str) -> float:
    """Seconds to restore every cached block of `ids` into `buffer` (the plan forced to restore them all)."""
    # one more token: a prompt's last token is always computed, so its own full blocks would not all match
    plan = manager.plan(rid, torch.cat([ids, ids[:1]]))
    n = len(ids) // manager.spec.block_tokens
    if plan.num_matched_blocks != n:
        raise RuntimeError(f"{rid}: {plan.num_matched_blocks} of {n} blocks cached")
    plan = dataclasses.replace(plan, split=0, restore_stop=n)
    start = time.perf_counter()
    loading = manager.load(rid, buffer, plan)
    intact = loading.wait()
    elapsed = time.perf_counter() - start
    manager.finish(rid)
    if intact != n:
        raise RuntimeError(f"{rid}: {intact} of {n} restored blocks intact")
    return elapsed


def load_cost_model(profile: str | None, spec: Any) -> tuple[CostModel, str]:
    path = profile or os.environ.get("KVTIER_PROFILE") or "/tmp/cal/profile.json"
    if os.path.exists(path):
        return CostModel.load(path, "smollm2-135m").with_spec(spec), path
    return CostModel.from_profile("cpu-this-machine", "smollm2-135m", spec=spec), "cpu-this-machine"


def measure(lengths: tuple[int, ...], root: str) -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
    prepared = prepare_model("smollm2-135m")
    model, spec = prepared.load_model(), prepared.spec
    torch.set_num_threads(2)
    T, top = spec.block_tokens, max(lengths)
    ids = torch.randint(0, model.config.vocab_size, (top,), generator=torch.Generator().manual_seed(0))
    recompute: dict[int, list[float]] = {P: [] for P in lengths}

    t0 = time.perf_counter()
    seconds, cache = timed_prefill(model, ids)  # the longest prefill: timed, and its KV is what gets stored
    recompute[top].append(seconds)
    print(f"recompute {top}: {seconds:.1f} s", file=sys.stderr, flush=True)
    kv = HFKVBuffer.from_cache(cache, spec)
    pool = top // T * spec.bytes_per_block + (64 << 20)
    host = OffloadManager(spec, OffloadConfig(host_bytes=pool, prefetch=False))
    host.store("seed", ids, kv)
    host.flush()
    disk_config = OffloadConfig(host_bytes=pool, disk_bytes=2 * pool, disk_path=os.path.join(root, "disk"),
                                prefetch=False)
    with OffloadManager(spec, disk_config) as writer:
        writer.store("seed", ids, kv)
    del cache, kv

    for P in lengths:
        for _ in range(recompute_repeats(P) - len(recompute[P])):
            seconds, _cache = timed_prefill(model, ids[:P])
            del _cache
            recompute[P].append(seconds)
        print(f"recompute {P}: {[round(s, 2) for s in recompute[P]]} s", file=sys.stderr, flush=True)
    recompute_wall = time.perf_counter() - t0

    data_file = DiskTier.data_file_of(disk_config.disk_path)
    rows = []
    for P in lengths:
        buffer = HFKVBuffer.allocate(spec, P)
        buffer.storage.zero_()  # fault the pages in: an engine reuses its restore buffer
        timed_load(host, ids[:P], buffer, f"warm-{P}")
        host_s = [timed_load(host, ids[:P], buffer, f"host-{P}-{i}") for i in range(HOST_REPEATS)]
        disk_s = []
        for i in range(DISK_REPEATS):
            left = coldcache.evict_file(data_file)
            if left:
                raise RuntimeError(f"{data_file}: {left} bytes still resident after eviction; the figure would be warm")
            with OffloadManager(spec, disk_config) as reader:
                disk_s.append(timed_load(reader, ids[:P], buffer, f"disk-{P}-{i}"))
        rows.append({"tokens": P, "kv_mb": round(P // T * spec.bytes_per_block / 1e6, 2),
                     "recompute_s": statistics.median(recompute[P]), "recompute_runs": len(recompute[P]),
                     "host_restore_s": statistics.median(host_s), "disk_restore_s": statistics.median(disk_s),
                     "recompute_all_s": [round(s, 4) for s in recompute[P]],
                     "host_all_s": [round(s, 5) for s in host_s], "disk_all_s": [round(s, 5) for s in disk_s]})
        print(f"restore {P}: host {rows[-1]['host_restore_s'] * 1e3:.1f} ms, disk {rows[-1]['disk_restore_s'] * 1e3:.1f} ms",
              file=sys.stderr, flush=True)
    host.close()
    return rows, spec, {"recompute_wall_s": round(recompute_wall, 1), "weights_revision": prepared.weights_revision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="calibrated cost model JSON (default $KVTIER_PROFILE or /tmp/cal/profile.json)")
    parser.add_argument("--max-tokens", type=int, default=max(LENGTHS), help="longest prefix measured (quick runs)")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG and the findings from the saved JSON")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(out_path("fig_measured_crossover.json").read_text())
        report(saved["rows"], saved["profile"], saved)
        return
    lengths = tuple(P for P in LENGTHS if P <= args.max_tokens)
    if not lengths:
        raise SystemExit(f"--max-tokens: expected >= {LENGTHS[0]}, got {args.max_tokens}")
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=".kvtier-fig2-", dir=".") as root:
        rows, spec, extra = measure(lengths, root)
    model, source = load_cost_model(args.profile, spec)
    builtin = CostModel.from_profile("cpu-this-machine", "smollm2-135m", spec=spec)
    for r in rows:
        P = r["tokens"]
        for name, cm in (("pred", model), ("builtin", builtin)):
            r[f"{name}_recompute_s"] = round(cm.recompute_s(0, P), 5)
            r[f"{name}_host_s"] = round(cm.restore_tokens_s("host", P), 6)
            r[f"{name}_disk_s"] = round(cm.restore_tokens_s("disk", P), 6)
        r["host_speedup"] = round(r["recompute_s"] / r["host_restore_s"], 1)
        r["disk_speedup"] = round(r["recompute_s"] / r["disk_restore_s"], 1)
    flat = [{k: v for k, v in r.items() if not k.endswith("_all_s")} for r in rows]
    write_csv("fig_measured_crossover.csv", flat)
    saved = {"machine": machine(), "model": spec.model_id, "dtype": "float32", "threads": 2,
             "block_tokens": spec.block_tokens, "profile": source, "rows": rows, **extra,
             "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
             "wall_s": round(time.perf_counter() - start, 1)}
    write_json("fig_measured_crossover.json", saved)
    report(rows, source, saved)


def report(rows: list[dict[str, Any]], source: str, saved: dict[str, Any]) -> None:
    """Draws the PNG and prints the findings line."""
    plot(rows, source)
    hi = rows[-1]
    span = lambda key: f"{min(r[key] for r in rows):.0f}x-{max(r[key] for r in rows):.0f}x"  # noqa: E731

    def ratio(key: str, pred: str) -> str:
        vals = [r[key] / r[pred] for r in rows]
        return f"{min(vals):.2f}-{max(vals):.2f}x"

    once = [r["tokens"] for r in rows if r["recompute_runs"] == 1]
    load = saved.get("load_avg_1min")
    load_note = f", load avg {load[0]:.1f}" if load else ""
    print(f"findings: SmolLM2-135M fp32 on this CPU (2 threads{load_note}), restore "
          f"beats recompute at every length {rows[0]['tokens']}-{hi['tokens']}: host restore {span('host_speedup')} "
          f"faster ({hi['host_restore_s'] * 1e3:.0f} ms vs {hi['recompute_s']:.1f} s at {hi['tokens']}), cold disk "
          f"{span('disk_speedup')} ({hi['disk_restore_s'] * 1e3:.0f} ms at {hi['tokens']}); measured/predicted by "
          f"{Path(source).name}: recompute {ratio('recompute_s', 'pred_recompute_s')}, host "
          f"{ratio('host_restore_s', 'pred_host_s')}, disk {ratio('disk_restore_s', 'pred_disk_s')}; recompute "
          f"measured once at {once or 'none'}; run {saved['wall_s']:.0f} s.")


def plot(rows: list[dict[str, Any]], source: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    P = [r["tokens"] for r in rows]
    series = (("recompute", "recompute_s", "pred_recompute_s", "builtin_recompute_s", "C3", "o"),
              ("restore from host", "host_restore_s", "pred_host_s", "builtin_host_s", "C0", "s"),
              ("restore from disk (cold)", "disk_restore_s", "pred_disk_s", "builtin_disk_s", "C1", "^"))
    for label, key, pred, builtin, color, marker in series:
        ax.plot(P, [r[key] for r in rows], marker, color=color, ms=7, label=f"{label}: measured")
        ax.plot(P, [r[pred] for r in rows], "-", color=color, lw=1.5, label=f"{label}: predicted ({Path(source).name})")
        ax.plot(P, [r[builtin] for r in rows], ":", color=color, lw=1, alpha=0.7)
    ax.fill_between(P, [r["disk_restore_s"] for r in rows], [r["recompute_s"] for r in rows], color="C2", alpha=0.08,
                    label="restore beats recompute (whole range)")
    for r in rows:
        ax.annotate(f"{r['host_speedup']:.0f}x / {r['disk_speedup']:.0f}x", (r["tokens"], r["recompute_s"]),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax.plot([], [], ":", color="gray", label="built-in cpu-this-machine profile (uncalibrated)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(P, [str(p) for p in P])
    ax.set_xlabel("cached prefix length P (tokens)")
    ax.set_ylabel("seconds to make P tokens of KV ready")
    ax.set_title("SmolLM2-135M fp32, 2 CPU threads: restore vs recompute (labels: host / disk speed-up)", fontsize=8)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_path("fig_measured_crossover.png"))


if __name__ == "__main__":
    main()
