"""A scripted multi-turn chat where each turn reuses the previous turns' KV through kvtier.

Every turn's prompt is the whole conversation so far (system prompt, earlier user turns and the
model's own replies) plus the new user message, as a chat server sends it. With kvtier, the blocks of
the previous turn's prompt and reply (saved after it, `store_output=True`) are restored from the host
tier and only the new tokens are computed; without it, the whole conversation is recomputed every
turn. Prints per-turn TTFT with and without kvtier (and checks both replies are the same tokens), and
writes experiments/out/multiturn_chat.json.

Model: SmolLM2-135M-Instruct if prepared (`kvtier models prepare smollm2-135m`), its tokenizer and
ChatML turns; else (or with --tiny) a tiny random Llama with synthetic token ids.

    .venv/bin/python experiments/multiturn_chat.py [--tiny] [--turns 5] [--new-tokens 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

SYSTEM = ("You are a helpful assistant for a travel agency. You answer briefly and precisely. The agency "
          "sells train and ferry trips in northern Europe: Oslo, Bergen, Stockholm, Helsinki, Tallinn, "
          "Copenhagen and Hamburg. Prices include seat reservations; bikes travel free on ferries but need a "
          "reservation on trains. Night trains have couchettes and sleepers; children under 6 travel free. ") * 3
USER_TURNS = (
    "I want to go from Hamburg to Oslo next week. Which options do I have?",
    "Is there a night train on that route, and can I take my bike?",
    "What about continuing from Oslo to Bergen afterwards?",
    "We are two adults and a four-year-old child. What do we pay for the child?",
    "Finally, how would we get back from Bergen to Hamburg by ferry?",
    "Please summarise the whole trip in three lines.",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="use the tiny random Llama even if SmolLM2 is prepared")
    parser.add_argument("--turns", type=int, default=5, help=f"user turns (1-{len(USER_TURNS)}, default 5)")
    parser.add_argument("--new-tokens", type=int, default=12, help="tokens generated per reply (default 12)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if not 1 <= args.turns <= len(USER_TURNS) or args.new_tokens < 1:
        parser.error(f"--turns: expected 1..{len(USER_TURNS)} and --new-tokens >= 1, "
                     f"got {args.turns}, {args.new_tokens}")

    import torch

    from kvtier.scheduler.config import OffloadConfig
    from kvtier.scheduler.engines.hf.adapter import HFEngine
    from kvtier.scheduler.engines.hf.kv import spec_for_model
    from kvtier.scheduler.engines.models import build_random_llama, prepared_model
    from kvtier.scheduler.manager import OffloadManager

    torch.set_num_threads(args.threads)
    prepared = None if args.tiny else prepared_model("smollm2-135m")
    if prepared is not None:
        model, spec, tokenizer = prepared.load_model(), prepared.spec, prepared.load_tokenizer()
        model_config, name = None, "SmolLM2-135M-Instruct"

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        def user(text: str) -> list[int]:
            return encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

        system, end_reply = encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"), encode("<|im_end|>\n")
        decode = tokenizer.decode
    else:
        model = build_random_llama(seed=0)
        spec = spec_for_model(model, "random-0", 16)
        model_config, name = model.config.to_dict(), "tiny random Llama (synthetic tokens)"
        gen = torch.Generator().manual_seed(0)

        def user(text: str) -> list[int]:
            return torch.randint(0, 256, (len(text) // 4 + 8,), generator=gen).tolist()

        system, end_reply = torch.randint(0, 256, (300,), generator=gen).tolist(), [1, 2]
        decode = None

    manager = OffloadManager(spec, OffloadConfig(host_bytes="512MiB", prefetch=False), model_config=model_config)
    with manager:
        cached, plain = HFEngine(model, manager), HFEngine(model)
        history = list(system)
        rows = []
        print(f"{name}, fp32, {args.threads} threads, {spec.block_tokens}-token blocks, kvtier host tier")
        print(f"{'turn':>4} {'prompt':>7} {'restored':>9} {'ttft plain ms':>14} {'ttft kvtier ms':>15} "
              f"{'speedup':>8}  same")
        start = time.perf_counter()
        for turn, text in enumerate(USER_TURNS[:args.turns], 1):
            prompt = history + user(text)
            base = plain.generate(prompt, args.new_tokens)
            mine = cached.generate(prompt, args.new_tokens, store_output=True)
            manager.flush()  # the save of this turn lands before the next (it runs after the reply here)
            same = torch.equal(base.tokens, mine.tokens)
            rows.append({"turn": turn, "prompt_tokens": len(prompt), "restored_tokens": mine.prefill.restored_tokens,
                         "ttft_plain_ms": round(base.ttft_s * 1e3, 1), "ttft_kvtier_ms": round(mine.ttft_s * 1e3, 1),
                         "speedup": round(base.ttft_s / mine.ttft_s, 2), "same_reply": same})
            r = rows[-1]
            print(f"{turn:>4} {len(prompt):>7} {r['restored_tokens']:>9} {r['ttft_plain_ms']:>14} "
                  f"{r['ttft_kvtier_ms']:>15} {r['speedup']:>8}  {same}")
            if decode is not None:
                print(f"     user: {text}\n     assistant: {decode(mine.tokens.tolist())!r}")
            history = prompt + mine.tokens.tolist() + end_reply
        stats = manager.stats()
    out = write_json("multiturn_chat.json", {"model": name, "threads": args.threads, "rows": rows,
                                             "seconds": round(time.perf_counter() - start, 1),
                                             "restored_blocks": stats["restored_blocks"],
                                             "saved_blocks": stats["saved_blocks"]})
    print(f"wrote {out}")
    return 0 if all(r["same_reply"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
