"""Hardware profiles and per-model FLOP counts: the raw numbers the cost model is built from.

Primitives:
- `HardwareProfile`: one machine's published (or measured) numbers: peak dense bf16 FLOP/s and an MFU,
  HBM bandwidth, the host link (PCIe / NVLink-C2C) bandwidth, latency and per-copy overhead, the NVMe read
  bandwidth and latency, zstd decode bandwidth and compression ratio, a per-layer launch overhead.
  `from_dict` / `to_dict` map it to the editable JSON file (scheduler/profiles/<name>.json).
- `load_profile(name_or_path)`, `list_profiles()`, `profile_path(name)`: profiles by name (searched in the
  directories of `$KVTIER_PROFILE_DIR`, then the packaged ones) or by path.
- `ModelFlops` and `model_flops(model)`: FLOPs per prompt token (dense matmuls, active experts only for MoE),
  attention FLOPs per token per context token (GQA does not reduce them; MLA counted with its real head
  dims), the last-token LM head, and the parameter counts, from a preset name or any HF config dict.
- `model_config(model)`: a preset name or HF config -> the config dict.

Invariants:
- every numeric profile field is a positive finite float (`mfu` and ratios in their ranges); unknown or
  missing keys are errors that name the file and the key, never silently dropped;
- a profile file may carry a `cost_model` section (written by `CostModel.to_json`, e.g. by `kvtier calibrate`);
  this module keeps it as raw data and the cost model reads it;
- nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import PRESETS, preset_config

#: the packaged profiles, one JSON file per named machine
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

#: environment variable: extra profile directories (os.pathsep-separated), searched before the packaged ones
PROFILE_DIR_ENV = "KVTIER_PROFILE_DIR"

FORMAT = "kvtier-profile/1"

#: the network profile a profile file without one gets: 100 Gb/s Ethernet at 80% efficiency, a 100 us round trip
DEFAULT_REMOTE_BYTES_PER_S = 100e9 / 8 * 0.8
DEFAULT_REMOTE_RTT_S = 100e-6


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """The numbers of one machine (one GPU and its links) that the cost model needs.

    Attributes:
        name: profile name, e.g. "h100-sxm".
        description: one line saying what machine this is.
        peak_flops: dense bf16 tensor FLOP/s of one GPU (no sparsity).
        mfu: fraction of `peak_flops` a prefill achieves (0 < mfu <= 1).
        hbm_bytes_per_s: GPU memory bandwidth.
        host_link_bytes_per_s: effective host -> GPU bandwidth per GPU from pinned memory, large copies.
        host_link_latency_s: fixed cost of one batched host -> GPU transfer (issue + completion event).
        copy_overhead_s: cost of each separate copy (one `cudaMemcpyAsync`) beyond its bytes.
        disk_bytes_per_s: sequential read bandwidth of the disk tier (one NVMe unless noted).
        disk_latency_s: fixed cost of one batched disk read (first I/O + transaction).
        disk_block_overhead_s: per-block cost of a disk read (one LMDB get, header check).
        zstd_decode_bytes_per_s: zstd decode throughput, uncompressed bytes out per second, all threads.
        zstd_ratio: uncompressed / compressed size of KV blocks (>= 1).
        layer_launch_s: fixed cost per layer of one forward pass (kernel launches), summed over layers.
        remote_bytes_per_s: the network profile of the remote tier: bytes per second of pipelined GETs from
            the shared pool (default: 100 Gb/s at 80% efficiency).
        remote_rtt_s: one round trip to the remote, server time included (default 100 us).
        notes: sources of the numbers and assumptions.
        cost_model: raw `cost_model` section (model, spec and fitted coefficients; written by
            `CostModel.to_json`, e.g. from `kvtier calibrate`), or None.
        source: the file it was loaded from ("" if built in memory).
    """

    name: str
    peak_flops: float
    hbm_bytes_per_s: float
    host_link_bytes_per_s: float
    host_link_latency_s: float
    copy_overhead_s: float
    disk_bytes_per_s: float
    disk_latency_s: float
    disk_block_overhead_s: float
    zstd_decode_bytes_per_s: float
    zstd_ratio: float
    layer_launch_s: float
    mfu: float = 0.5
    remote_bytes_per_s: float = DEFAULT_REMOTE_BYTES_PER_S
    remote_rtt_s: float = DEFAULT_REMOTE_RTT_S
    description: str = ""
    notes: str = ""
    cost_model: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"profile name: expected a non-empty string, got {self.name!r}")
        for name in _NUMERIC:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"profile {self.name!r}: {name} must be a finite number, got {value!r}")
            lower_ok = value >= 0 if name in _MAY_BE_ZERO else value > 0
            if not lower_ok:
                raise ConfigError(f"profile {self.name!r}: {name} must be "
                                  f"{'>= 0' if name in _MAY_BE_ZERO else '> 0'}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.mfu > 1:
            raise ConfigError(f"profile {self.name!r}: mfu must be in (0, 1], got {self.mfu!r}")
        if self.zstd_ratio < 1:
            raise ConfigError(f"profile {self.name!r}: zstd_ratio must be >= 1, got {self.zstd_ratio!r}")

    @property
    def flops_per_s(self) -> float:
        """Achieved FLOP/s of a prefill: peak x MFU."""
        return self.peak_flops * self.mfu

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "") -> "HardwareProfile":
        """Builds a profile from its JSON object.

        Raises:
            ConfigError: a key is missing or unknown, or a value is out of range (names `source` and the key).
        """
        where = source or "profile"
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise ConfigError(f"{where}: format {fmt!r} is not supported; expected {FORMAT!r}")
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"expected keys among {', '.join(sorted(known))}")
        missing = [name for name in ("name", *_NUMERIC) if name not in data and name not in _OPTIONAL]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        notes = data.get("notes", "")
        if isinstance(notes, list):
            notes = "\n".join(map(str, notes))
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["notes"] = notes
        try:
            return cls(**kwargs, source=source)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this profile (what `from_dict` reads back)."""
        out: dict[str, Any] = {"format": FORMAT, "name": self.name, "description": self.description}
        for name in _NUMERIC:
            out[name] = getattr(self, name)
        out["notes"] = self.notes.split("\n") if self.notes else []
        if self.cost_model is not None:
            out["cost_model"] = dict(self.cost_model)
        return out

    def with_(self, **changes: Any) -> "HardwareProfile":
        """A copy with some fields changed (validated again)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return HardwareProfile(**data)


_NUMERIC = ("peak_flops", "mfu", "hbm_bytes_per_s", "host_link_bytes_per_s", "host_link_latency_s",
            "copy_overhead_s", "disk_bytes_per_s", "disk_latency_s", "disk_block_overhead_s",
            "zstd_decode_bytes_per_s", "zstd_ratio", "layer_launch_s", "remote_bytes_per_s", "remote_rtt_s")
#: numeric fields a profile file may leave out (their defaults apply)
_OPTIONAL = {"mfu", "remote_bytes_per_s", "remote_rtt_s"}
_MAY_BE_ZERO = {"remote_rtt_s", "host_link_latency_s", "copy_overhead_s", "disk_latency_s", "disk_block_overhead_s",
                "layer_launch_s"}


def _search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(PROFILE_DIR_ENV, "").split(os.pathsep) if p]
    return [*extra, PROFILE_DIR]


def profile_path(name: str) -> Path:
    """The file of a named profile (first match in `$KVTIER_PROFILE_DIR`, then the packaged directory).

    Raises:
        ConfigError: no profile of that name exists.
    """
    for directory in _search_dirs():
        candidate = directory / f"{name}.json"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"hardware profile: {name!r} is unknown; expected one of {', '.join(profile_names())} "
                      f"or a path to a profile JSON file")


def profile_names() -> list[str]:
    """Names of every profile found (user directories first, duplicates shadowed), sorted."""
    names: set[str] = set()
    for directory in _search_dirs():
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.json"))
    return sorted(names)


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """Loads a profile by name (e.g. "h100-sxm") or from a JSON file path.

    Raises:
        ConfigError: unknown name, unreadable file, invalid JSON or an invalid profile.
    """
    text = os.fspath(name_or_path)
    path = Path(text)
    if not (text.endswith(".json") or os.sep in text or path.is_file()):
        path = profile_path(text)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"hardware profile: file {str(path)!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"hardware profile: cannot read {str(path)!r}: {err}") from err
    return HardwareProfile.from_dict(data, source=str(path))


def list_profiles() -> list[HardwareProfile]:
    """Every profile found, sorted by name."""
    return [load_profile(profile_path(name)) for name in profile_names()]


# -- model FLOPs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelFlops:
    """FLOP and parameter counts of one model, per prompt token.

    Attributes:
        name: the model's name.
        num_layers: decoder layers.
        linear_flops_per_token: 2 x the active matmul parameters of the decoder layers (no LM head):
            the FLOPs of one prompt token that do not depend on its position.
        attention_flops_per_ctx: FLOPs of one token per context token it attends to, over all layers:
            2 x heads x (qk_dim + v_dim) per layer (QK^T and AV); GQA shares K/V but not these FLOPs.
        lm_head_flops: FLOPs of the LM head for one token (a prefill needs only the last token's logits).
        active_params: parameters a token touches (decoder + LM head; MoE: shared + routed top-k experts).
        total_params: all parameters (embeddings and every expert).
        weight_itemsize: bytes per weight (2 for bf16/fp16, 4 for fp32).
    """

    name: str
    num_layers: int
    linear_flops_per_token: float
    attention_flops_per_ctx: float
    lm_head_flops: float
    active_params: float
    total_params: float
    weight_itemsize: int


def model_config(model: str | Mapping[str, Any]) -> dict[str, Any]:
    """A preset name (see `kvtier.tiers.spec.PRESETS`) or a HF config mapping -> config dict.

    Raises:
        ConfigError: an unknown preset name or a value that is neither.
    """
    if isinstance(model, str):
        return preset_config(model)
    if isinstance(model, Mapping):
        cfg = dict(model)
        if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), Mapping):
            cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k != "text_config"}}
        return cfg
    to_dict = getattr(model, "to_dict", None)
    if callable(to_dict):
        return model_config(to_dict())
    raise ConfigError(f"model: expected a preset name ({', '.join(PRESETS)}) or a HF config, got {model!r}")


def model_flops(model: str | Mapping[str, Any]) -> ModelFlops:
    """Counts the FLOPs per prompt token of a model from its config.

    Dense attention: q and o are hidden x (heads x head_dim), k and v hidden x (kv_heads x head_dim).
    MLA (a `kv_lora_rank` key): the q low-rank path (or a full q projection without `q_lora_rank`), the
    kv down-projection, the kv up-projection and o, with attention over heads x (qk_nope + qk_rope) for
    QK^T and heads x v_head_dim for AV (prefill runs MLA un-absorbed). MLP: gated (3 matrices); MoE layers
    (after `first_k_dense_replace`) count the shared experts, the top-k routed experts and the router.

    Raises:
        ConfigError: a field the count needs is missing.
    """
    cfg = model_config(model)
    name = str(model) if isinstance(model, str) else str(cfg.get("_name_or_path") or cfg.get("model_type", "model"))

    def need(key: str) -> int:
        if cfg.get(key) is None:
            raise ConfigError(f"model config {name!r}: missing {key!r}, needed for the FLOP count")
        return int(cfg[key])

    layers, hidden, heads, vocab = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads"), \
        need("vocab_size")
    if cfg.get("kv_lora_rank"):
        rank, rope = int(cfg["kv_lora_rank"]), int(cfg.get("qk_rope_head_dim") or 0)
        nope = int(cfg.get("qk_nope_head_dim") or 0)
        v_dim = int(cfg.get("v_head_dim") or nope)
        qk_dim = nope + rope
        q_rank = cfg.get("q_lora_rank")
        q_params = (hidden * int(q_rank) + int(q_rank) * heads * qk_dim) if q_rank else hidden * heads * qk_dim
        attn_params = q_params + hidden * (rank + rope) + rank * heads * (nope + v_dim) + heads * v_dim * hidden
        attn_ctx = 2 * heads * (qk_dim + v_dim)
    else:
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        attn_params = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
        attn_ctx = 2 * heads * (2 * head_dim)
    dense_mlp = 3 * hidden * need("intermediate_size")
    num_experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if num_experts:
        expert = 3 * hidden * int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
        top_k = int(cfg.get("num_experts_per_tok") or 1)
        shared = int(cfg.get("n_shared_experts") or 0)
        dense_layers = min(int(cfg.get("first_k_dense_replace") or 0), layers)
        moe_layers = layers - dense_layers
        router = hidden * num_experts
        active_mlp = dense_layers * dense_mlp + moe_layers * ((shared + top_k) * expert + router)
        total_mlp = dense_layers * dense_mlp + moe_layers * ((shared + num_experts) * expert + router)
    else:
        active_mlp = total_mlp = layers * dense_mlp
    decoder_active = layers * attn_params + active_mlp
    decoder_total = layers * attn_params + total_mlp
    embed = hidden * vocab
    tied = bool(cfg.get("tie_word_embeddings"))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return ModelFlops(
        name=name, num_layers=layers,
        linear_flops_per_token=2.0 * decoder_active,
        attention_flops_per_ctx=float(layers * attn_ctx),
        lm_head_flops=2.0 * embed,
        active_params=float(decoder_active + embed),
        total_params=float(decoder_total + embed * (1 if tied else 2)),
        weight_itemsize=4 if "32" in dtype else 2,
    )


_NUMBER_LINE = re.compile(r'^(\s*"[^"]+": )(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)(,?)$', re.MULTILINE)


def dumps_profile(data: Mapping[str, Any]) -> str:
    """JSON text of a profile, one key per line, numbers in their shortest exact form (989e12 -> 9.89e+14).

    Users edit these files by hand, so `121000000000000.0` is written as `1.21e+14`.
    """
    text = json.dumps(data, indent=2)

    def short(match: re.Match[str]) -> str:
        if not any(c in match.group(2) for c in ".eE"):
            return match.group(0)  # an int stays an int
        value = float(match.group(2))
        formatted = repr(value)
        if not 1e-3 <= abs(value) < 1e4 and value != 0:  # shortest exact scientific form
            formatted = next(f for f in (f"{value:.{p}e}" for p in range(17)) if float(f) == value)
        return f"{match.group(1)}{formatted}{match.group(3)}"

    return _NUMBER_LINE.sub(short, text) + "\n"
