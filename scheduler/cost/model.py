"""CostModel: predicted seconds to restore cached KV blocks from each tier and to recompute tokens.

Primitives (`RestorePath`, `CopyGranularity`, `PathCost`, `RecomputeCost` are in `cost.parts`):
- `CostModel`: one model on one machine (and TP degree): the four paths, the recompute cost and a decode
  step estimate. Built from a `HardwareProfile` (`from_profile`), refitted from measurements
  (`kvtier.scheduler.cost.fit.fit_model`), saved as the same JSON profile format (`to_json` / `from_json` / `save` / `load`).

Derivation from a hardware profile (all per GPU; TP splits the FLOPs and the KV heads, each GPU has its own
host link, the disk is shared and reads every shard):
- host: host link latency; bytes / host link bandwidth; one copy overhead per copy;
- gpu: a device-to-device copy (read + write: bytes / (HBM / 2));
- disk, disk_zstd: disk -> host -> GPU pipelined, so per block the slowest stage counts (disk read of
  bytes / ratio, zstd decode of bytes, host link of bytes plus copies); latencies add;
- remote: network -> host -> GPU pipelined the same way (the network profile: one round trip, then bytes at
  `remote_bytes_per_s`; the host link);
- recompute: per_token_s = 2 x active params / (peak x MFU x TP); per_token_ctx_s = attention FLOPs per
  context token / (peak x MFU x TP); fixed_s = layers x launch overhead + one token's LM head.

Invariants: predictions are non-negative, monotone in n and in start, and 0 for nothing; no torch import.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import KVSpec

from kvtier.scheduler.cost.parts import UNBOUNDED, CopyGranularity, PathCost, RecomputeCost, RestorePath, parse_enum
from kvtier.scheduler.cost.hardware import HardwareProfile, ModelFlops, dumps_profile, load_profile, model_config, model_flops

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Predicted restore and recompute times of one model on one machine.

    Attributes:
        profile: the hardware profile the coefficients come from.
        model: the model's name; `config` its HF style config.
        spec: the KV geometry (full model, all TP shards).
        tp: tensor-parallel degree (per-GPU FLOPs and KV shard).
        copy_granularity: copies per block on the host link.
        paths: restore cost per path name (`RestorePath` values).
        recompute: the recompute coefficients.
        flops: the model's FLOP counts (for the decode estimate).
        fitted: names of the parts measured rather than derived ("host", ..., "recompute").
    """

    profile: HardwareProfile
    model: str
    config: Mapping[str, Any]
    spec: KVSpec
    tp: int
    copy_granularity: CopyGranularity
    paths: Mapping[str, PathCost]
    recompute: RecomputeCost
    flops: ModelFlops
    fitted: frozenset[str] = frozenset()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_profile(cls, profile: HardwareProfile | str | os.PathLike[str], model: str | Mapping[str, Any], *,
                     spec: KVSpec | None = None, block_tokens: int = 64, tp: int = 1,
                     copy_granularity: CopyGranularity | str = CopyGranularity.BLOCK) -> "CostModel":
        """Derives every coefficient from a hardware profile and a model config.

        Args:
            profile: a profile, its name or its JSON path.
            model: a preset name (`kvtier.tiers.spec.PRESETS`) or a HF config dict.
            spec: the KV geometry; by default the config's with `block_tokens`.
            block_tokens: tokens per block when `spec` is not given.
            tp: tensor-parallel degree.
            copy_granularity: copies per block on the host link.

        Raises:
            ConfigError: unknown profile or model, or a bad argument.
        """
        if not isinstance(profile, HardwareProfile):
            profile = load_profile(profile)
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ConfigError(f"tp: expected a positive int, got {tp!r}")
        config = model_config(model)
        name = model if isinstance(model, str) else str(config.get("_name_or_path") or config.get("model_type", "model"))
        spec = spec or KVSpec.from_hf_config(config, model_id=str(config.get("_name_or_path") or name),
                                             block_tokens=block_tokens)
        granularity = parse_enum(CopyGranularity, copy_granularity, "copy_granularity")
        flops = model_flops(config)
        paths = _derive_paths(profile, spec, tp, granularity)
        compute_s = profile.flops_per_s * tp
        recompute = RecomputeCost(
            fixed_s=flops.num_layers * profile.layer_launch_s + flops.lm_head_flops / compute_s,
            per_token_s=flops.linear_flops_per_token / compute_s,
            per_token_ctx_s=flops.attention_flops_per_ctx / compute_s)
        return cls(profile=profile, model=name, config=config, spec=spec, tp=tp, copy_granularity=granularity,
                   paths=paths, recompute=recompute, flops=flops)

    def with_spec(self, spec: KVSpec) -> "CostModel":
        """The same model and machine for another KV geometry (e.g. another `block_tokens`).

        Derived parts are derived again; fitted restore paths keep their coefficients (bytes and copies
        per block follow the new spec); a fitted recompute is kept.
        """
        base = CostModel.from_profile(self.profile, self.config, spec=spec, tp=self.tp,
                                      copy_granularity=self.copy_granularity)
        paths = dict(base.paths)
        for name in self.fitted & set(paths):
            old = self.paths[name]
            paths[name] = replace(old, bytes_per_block=base.paths[name].bytes_per_block,
                                  copies_per_block=base.paths[name].copies_per_block)
        recompute = self.recompute if "recompute" in self.fitted else base.recompute
        return replace(base, model=self.model, paths=paths, recompute=recompute, fitted=self.fitted)

    def with_block_tokens(self, block_tokens: int) -> "CostModel":
        """`with_spec` for another block size (self when it is already that size)."""
        if block_tokens == self.spec.block_tokens:
            return self
        return self.with_spec(self.spec.with_(block_tokens=block_tokens))

    # -- predictions ----------------------------------------------------------------------------

    def path(self, path: RestorePath | str) -> PathCost:
        """The cost of one restore path.

        Raises:
            ConfigError: an unknown path name.
        """
        try:
            return self.paths[str(path)]
        except KeyError:
            raise ConfigError(f"restore path: {path!r} is unknown; expected one of {', '.join(self.paths)}") from None

    def restore_s(self, path: RestorePath | str, num_blocks: int) -> float:
        """Seconds to restore `num_blocks` blocks from `path` in one batched transfer."""
        return self.path(path).time_s(num_blocks)

    def restore_tokens_s(self, path: RestorePath | str, num_tokens: int) -> float:
        """Seconds to restore the blocks covering `num_tokens` tokens (rounded up to whole blocks)."""
        return self.restore_s(path, -(-num_tokens // self.spec.block_tokens))

    def recompute_s(self, start_tokens: int, num_tokens: int) -> float:
        """Seconds to prefill tokens [start_tokens, start_tokens + num_tokens)."""
        return self.recompute.time_s(start_tokens, num_tokens)

    def break_even_bytes_per_s(self, path: RestorePath | str, num_tokens: int, start_tokens: int = 0) -> float:
        """The bandwidth at which restoring tokens [start, start + n) over `path` takes as long as recomputing
        them (the path's latency, per-block and per-copy costs kept); `math.inf` when those alone are slower.
        """
        cost = self.path(path)
        blocks = -(-num_tokens // self.spec.block_tokens)
        fixed = cost.latency_s + blocks * (cost.per_block_s + cost.copies_per_block * cost.per_copy_s)
        spare = self.recompute_s(start_tokens, num_tokens) - fixed
        return blocks * cost.bytes_per_block / spare if spare > 0 else math.inf

    def decode_step_s(self, batch_size: int = 1, context_tokens: int = 0) -> float:
        """Rough seconds of one decode step: max(weights + KV bytes / HBM, FLOPs / achieved FLOP/s).

        Args:
            batch_size: sequences decoded together.
            context_tokens: mean context length of each sequence.
        """
        kv_bytes = batch_size * context_tokens * self.paths["host"].bytes_per_block / self.spec.block_tokens
        weight_bytes = self.flops.active_params * self.flops.weight_itemsize / self.tp
        memory_s = (weight_bytes + kv_bytes) / self.profile.hbm_bytes_per_s
        flops = batch_size * (self.flops.linear_flops_per_token + self.flops.lm_head_flops
                              + self.flops.attention_flops_per_ctx * context_tokens)
        compute_s = flops / (self.profile.flops_per_s * self.tp)
        return max(memory_s, compute_s) + self.flops.num_layers * self.profile.layer_launch_s

    # -- JSON -----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The profile JSON object: the hardware numbers plus a `cost_model` section (model, geometry,
        and every fitted coefficient), which `from_json` reads back to an equal model."""
        data = self.profile.with_(cost_model=None).to_dict()
        data["cost_model"] = {
            "model": self.model,
            "model_config": dict(self.config),
            "spec": self.spec.fields(),
            "tp": self.tp,
            "copy_granularity": self.copy_granularity.value,
            "fitted": {name: (self.recompute if name == "recompute" else self.paths[name]).to_dict()
                       for name in sorted(self.fitted)},
        }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], model: str | Mapping[str, Any] | None = None, *,
                  spec: KVSpec | None = None, block_tokens: int | None = None, tp: int | None = None,
                  copy_granularity: CopyGranularity | str | None = None, source: str = "") -> "CostModel":
        """Builds a model from a profile JSON object (a plain hardware profile or one `to_json` wrote).

        Args:
            data: the JSON object.
            model: the model; by default the one in the `cost_model` section. A fitted recompute is used
                only for the model it was measured on; fitted restore paths apply to any model.
            spec, block_tokens, tp, copy_granularity: override the section's values.
            source: the file name, for error messages.

        Raises:
            ConfigError: an invalid profile, or no model given and none in the file.
        """
        profile = HardwareProfile.from_dict(data, source=source)
        section = dict(profile.cost_model or {})
        where = source or profile.name
        if model is None:
            if "model_config" not in section and "model" not in section:
                raise ConfigError(f"{where}: profile {profile.name!r} names no model; pass a model "
                                  f"(a preset name or a HF config)")
            model = section.get("model_config") or section["model"]
            name = str(section.get("model") or "model")
        else:
            name = model if isinstance(model, str) else str(dict(model).get("_name_or_path", "model"))
        same_model = name == section.get("model")
        if spec is None and same_model and "spec" in section:
            try:
                spec = KVSpec(**section["spec"])
            except TypeError as err:
                raise ConfigError(f"{where}: cost_model.spec is not a KVSpec: {err}") from None
        if spec is not None and block_tokens is not None:
            spec = spec.with_(block_tokens=block_tokens)
        base = cls.from_profile(profile, model, spec=spec, block_tokens=block_tokens or 64,
                                tp=tp if tp is not None else int(section.get("tp", 1)),
                                copy_granularity=copy_granularity or section.get("copy_granularity", "block"))
        base = replace(base, model=name)
        fitted = section.get("fitted") or {}
        if not isinstance(fitted, Mapping):
            raise ConfigError(f"{where}: cost_model.fitted must be an object, got {type(fitted).__name__}")
        paths, recompute, names = dict(base.paths), base.recompute, set()
        for part, coeffs in fitted.items():
            try:
                if part == "recompute":
                    if not same_model:
                        log.warning("%s: recompute was fitted for %r, not %r; deriving it from the profile",
                                    where, section.get("model"), name)
                        continue
                    recompute = RecomputeCost(**coeffs)
                else:
                    parse_enum(RestorePath, part, f"{where}: cost_model.fitted key")
                    paths[part] = replace(paths[part], **coeffs)
            except TypeError as err:
                raise ConfigError(f"{where}: cost_model.fitted.{part}: {err}") from None
            names.add(part)
        return replace(base, paths=paths, recompute=recompute, fitted=frozenset(names))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes `to_json()` to `path` (atomically: a temporary file, then a rename)."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(dumps_profile(self.to_json()))
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: str | Mapping[str, Any] | None = None,
             **overrides: Any) -> "CostModel":
        """Loads a profile by name or path (see `from_json` for `model` and the overrides).

        Raises:
            ConfigError: unknown name, unreadable or invalid file, or no model.
        """
        profile = load_profile(path)
        return cls.from_json(profile.to_dict(), model, source=profile.source, **overrides)


def _derive_paths(profile: HardwareProfile, spec: KVSpec, tp: int,
                  granularity: CopyGranularity) -> dict[str, PathCost]:
    """The four restore paths of `spec` on `profile` (module docstring: pipelined stages, per GPU)."""
    kv_heads = spec.num_kv_heads
    shard_heads = max(1, -(-kv_heads // tp))
    link_bytes = spec.bytes_per_block * shard_heads // kv_heads
    disk_bytes = spec.bytes_per_block  # the shared disk reads every shard
    copies = granularity.copies_per_block(spec)
    p = profile
    host = PathCost(latency_s=p.host_link_latency_s, bytes_per_s=p.host_link_bytes_per_s, bytes_per_block=link_bytes,
                    per_copy_s=p.copy_overhead_s, copies_per_block=copies)
    gpu = PathCost(latency_s=p.host_link_latency_s, bytes_per_s=p.hbm_bytes_per_s / 2, bytes_per_block=link_bytes,
                   per_copy_s=p.copy_overhead_s, copies_per_block=copies)
    disk_latency = p.disk_latency_s + p.host_link_latency_s
    # the disk stage expressed per link byte, so that every stage of a path shares bytes_per_block
    scale = link_bytes / disk_bytes
    disk_read = PathCost(latency_s=disk_latency, bytes_per_s=p.disk_bytes_per_s * scale, bytes_per_block=link_bytes,
                         per_block_s=p.disk_block_overhead_s, copies_per_block=0)
    zstd_read = replace(disk_read, bytes_per_s=p.disk_bytes_per_s * p.zstd_ratio * scale)
    zstd_decode = PathCost(latency_s=disk_latency, bytes_per_s=p.zstd_decode_bytes_per_s * scale,
                           bytes_per_block=link_bytes, copies_per_block=0)
    link = replace(host, latency_s=disk_latency)
    # the remote: the network (a round trip, then the shared pool's bytes of every shard), then the host link
    net_latency = p.remote_rtt_s + p.host_link_latency_s
    net = PathCost(latency_s=net_latency, bytes_per_s=p.remote_bytes_per_s * scale, bytes_per_block=link_bytes,
                   per_block_s=p.disk_block_overhead_s, copies_per_block=0)
    return {"gpu": gpu, "host": host,
            "disk": max(disk_read, link, key=lambda c: c.block_s),
            "disk_zstd": max(zstd_read, zstd_decode, link, key=lambda c: c.block_s),
            "remote": max(net, replace(host, latency_s=net_latency), key=lambda c: c.block_s)}


__all__ = ["CopyGranularity", "CostModel", "PathCost", "RecomputeCost", "RestorePath", "UNBOUNDED"]
