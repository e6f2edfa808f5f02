"""Automatic prefix caching, with and without, in one run: 32 streaming clients at once, each a chat
whose ~1,000-token system prompt is the same and whose question is its own.

    python -m bench.prefix                        # the default model in the machine's fast dtype
    python -m bench.prefix --clients 32 --system-tokens 1000 --max-new-tokens 64

Each server starts cold (nothing cached) and serves one wave of the clients' requests: the first
requests compute the system prompt, later ones find its blocks. Prints TTFT and output tok/s for
both servers and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from tgserve.benchmark.loadgen import TOPICS, run_load
from tgserve.benchmark.sweep import start_server
from tgserve import hardware
from tgserve.config import DEFAULT_MODEL_ID, ModelConfig
from tgserve.weights.locate import locate_model

RULES = [
    "Answer in plain English and keep each answer short unless the user asks for detail.",
    "When a question is ambiguous, say which reading you answer and why.",
    "Prefer concrete examples over abstract statements, and numbers over adjectives.",
    "Never invent sources, quotations, dates or figures; say when you are not sure.",
    "Use metric units, and give both units when the user writes in imperial ones.",
    "Do not repeat the question back; start with the answer itself.",
    "If the user asks for code, give a complete, runnable snippet and explain it briefly.",
    "Keep a friendly, neutral tone, without flattery and without apologising needlessly.",
]


def system_prompt(tokenizer, tokens: int) -> str:
    """Numbered house rules, repeated with new numbers until the prompt has about `tokens` tokens."""
    lines: list[str] = ["You are the assistant of a public library's help desk. Follow these rules."]
    while len(tokenizer("\n".join(lines)).input_ids) < tokens:
        lines.append(f"Rule {len(lines)}: {RULES[len(lines) % len(RULES)]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    parser.add_argument("--dtype", default=None, help="default: the server's default on this machine")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=3988)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    dtype = args.dtype or hardware.default_dtype(hardware.default_device())
    model_dir = locate_model(ModelConfig(model_id=args.model_id))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    system = system_prompt(tokenizer, args.system_tokens)
    prompts = [tokenizer.apply_chat_template(
        [{"role": "system", "content": system},
         {"role": "user", "content": f"Where would I find books about {TOPICS[i % len(TOPICS)]}? ({i})"}],
        tokenize=False, add_generation_prompt=True) for i in range(args.clients)]
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    print(f"model {args.model_id} ({dtype}); {args.clients} clients at once, prompts of {min(lengths)}-"
          f"{max(lengths)} tokens sharing a {len(tokenizer(system).input_ids)}-token system prompt, "
          f"{args.max_new_tokens} new tokens each", flush=True)

    rows = {}
    for name, flags in (("prefix caching", []), ("--no-prefix-caching", ["--no-prefix-caching"])):
        server = start_server(model_dir, dtype, args.port, flags)
        try:
            url = f"http://127.0.0.1:{args.port}"
            result = asyncio.run(run_load(url, prompts, args.clients, args.clients, args.max_new_tokens))
            rows[name] = result.summary()
            print(f"  {name}: {rows[name]}", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)

    on, off = rows["prefix caching"], rows["--no-prefix-caching"]
    print("\n| server | output tok/s | TTFT p50 | TTFT p90 | ITL p50 | errors |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['output_tok_s']:.1f} | {row['ttft_p50']:.2f} s | {row['ttft_p90']:.2f} s | "
              f"{row['itl_p50'] * 1000:.1f} ms | {row['errors']} |")
    print(f"\nwith / without: tok/s {on['output_tok_s'] / off['output_tok_s']:.2f}x, "
          f"TTFT p50 {on['ttft_p50'] / off['ttft_p50']:.2f}x, TTFT p90 {on['ttft_p90'] / off['ttft_p90']:.2f}x")


if __name__ == "__main__":
    main()
