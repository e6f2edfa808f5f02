"""What sampling parameters and grammars cost under load, against all-greedy in the same run.

    python -m bench.sampling                 # default model, the server's default dtype, 32 clients

Three runs on one server, 32 closed-loop streaming clients, 128 new tokens per request:
  greedy   every request greedy;
  sampled  every request temperature 0.8 + top-k 50 + top-p 0.9 + repetition penalty 1.1 (own seed);
  grammar  4 clients ask for JSON under a JSON schema (ending at EOS, then asking again), the other
           28 greedy: their rate is compared with the greedy run's per-client rate.
Prints each figure and its ratio to the greedy run; grammar outputs are checked with jsonschema.
Before the server runs, the same three batches are timed in-process (median engine step with 32
decoding sequences): a steadier figure than load over HTTP on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

import jsonschema
import torch

from tgserve.benchmark.loadgen import make_prompts, run_load
from tgserve.benchmark.sweep import start_server
from tgserve import hardware
from tgserve.config import DEFAULT_MODEL_ID, ModelConfig
from tgserve.weights.locate import locate_model

SAMPLED = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "facts": {"type": "array", "minItems": 2, "maxItems": 3,
              "items": {"type": "object", "properties": {"fact": {"type": "string", "maxLength": 48},
                                                         "year": {"type": "integer"}},
                        "required": ["fact", "year"]}}},
    "required": ["title", "facts"]}
GRAMMAR_CLIENTS = 4


def grammar_prompts(tokenizer) -> list[str]:
    topics = ["the printing press", "volcanoes", "the moon landing", "honey bees", "the Roman empire", "glass"]
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Give a title and a few dated facts about {t} as JSON."}],
        tokenize=False, add_generation_prompt=True) for t in topics]


def step_times(model_dir: str, dtype: str, rows: int, steps: int = 40) -> dict[str, float]:
    """Median engine step (ms) with `rows` sequences decoding: greedy, sampled, grammar mix."""
    import statistics

    from tgserve.config import CacheConfig, Config, SchedulerConfig, ServerConfig
    from tgserve.engine.core import create_engine
    from tgserve.params import GrammarSpec, SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    config = Config(model=ModelConfig(path=model_dir, dtype=dtype),
                    server=ServerConfig(max_total_tokens=2048, max_input_tokens=2047),
                    scheduler=SchedulerConfig(max_batch_prefill_tokens=512),
                    cache=CacheConfig(max_batch_total_tokens=rows * 512))
    core, _ = create_engine(config)
    schema = GrammarSpec("json_schema", json.dumps(SCHEMA))
    kinds = {
        "greedy": lambda i: SamplingParams(),
        "sampled": lambda i: SamplingParams(**SAMPLED, seed=i),
        "grammar": lambda i: SamplingParams(grammar=schema) if i < GRAMMAR_CLIENTS else SamplingParams(),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(3):  # interleaved, so drift on a shared machine touches every kind alike
        for kind, params in kinds.items():
            ids = [f"{kind}-{round_}-{i}" for i in range(rows)]
            for i, request_id in enumerate(ids):
                core.scheduler.add(AddRequest(request_id, list(range(100, 140 + i)), params(i),
                                              StoppingParams(max_new_tokens=steps + 40, ignore_eos=True), 0.0))
            for _ in range(12):  # prefill, then every sequence decodes
                core.step()
            for _ in range(steps):
                start = time.perf_counter()
                core.step()
                times[kind].append(time.perf_counter() - start)
            core.scheduler.abort(ids)
            core.runner.release(core.scheduler.pop_finished())
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    parser.add_argument("--dtype", default=None, help="default: the server's default on this machine")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--port", type=int, default=3988)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    dtype = args.dtype or hardware.default_dtype(hardware.default_device())
    model_dir = locate_model(ModelConfig(model_id=args.model_id))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, json_prompts = make_prompts(tokenizer), grammar_prompts(tokenizer)
    c, n, new = args.concurrency, args.requests, args.max_new_tokens
    # grammar requests end when their JSON is complete (EOS), with room enough to complete it
    grammar = {"grammar": {"type": "json", "value": SCHEMA}, "ignore_eos_token": False, "max_new_tokens": 192}
    print(f"model {args.model_id} ({dtype}), {c} clients, {n} requests of {new} tokens per run", flush=True)
    steps = step_times(model_dir, dtype, c)
    print(f"engine step, {c} decoding sequences (median): " +
          ", ".join(f"{k} {v:.1f} ms ({steps['greedy'] / v:.2f}x greedy's rate)" for k, v in steps.items()),
          flush=True)

    server = start_server(model_dir, dtype, args.port, [])
    url = f"http://127.0.0.1:{args.port}"
    try:
        asyncio.run(run_load(url, prompts, 4, 8, 16))  # warm-up
        greedy = asyncio.run(run_load(url, prompts, c, n, new))
        sampled = asyncio.run(run_load(url, prompts, c, n, new,
                                       parameters=lambda client, i: {**SAMPLED, "seed": i}))
        mixed = asyncio.run(run_load(
            url, prompts, c, n, new,
            parameters=lambda client, i: grammar if client < GRAMMAR_CLIENTS else {},
            client_prompts=lambda client: json_prompts if client < GRAMMAR_CLIENTS else prompts))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)

    g, s = greedy.summary(), sampled.summary()
    others = mixed.summary(lambda client: client >= GRAMMAR_CLIENTS)
    constrained = mixed.summary(lambda client: client < GRAMMAR_CLIENTS)
    invalid = 0
    for r in mixed.results:
        if r.client < GRAMMAR_CLIENTS and r.error is None:
            try:
                jsonschema.validate(json.loads(r.text), SCHEMA)
            except (ValueError, jsonschema.ValidationError):
                invalid += 1
    per_client_greedy = g["output_tok_s"] / c
    per_client_others = others["output_tok_s"] / (c - GRAMMAR_CLIENTS)
    print("\n| run | output tok/s | vs greedy | ITL p50 | ITL p90 | errors |")
    print("|---|---|---|---|---|---|")
    print(f"| greedy, {c} clients | {g['output_tok_s']:.1f} | 1.00x | {g['itl_p50'] * 1000:.1f} ms | "
          f"{g['itl_p90'] * 1000:.1f} ms | {g['errors']} |")
    print(f"| temperature + top-k + top-p + repetition penalty, {c} clients | {s['output_tok_s']:.1f} | "
          f"{s['output_tok_s'] / g['output_tok_s']:.2f}x | {s['itl_p50'] * 1000:.1f} ms | "
          f"{s['itl_p90'] * 1000:.1f} ms | {s['errors']} |")
    print(f"| the {c - GRAMMAR_CLIENTS} greedy clients beside {GRAMMAR_CLIENTS} JSON-grammar clients, per client | "
          f"{per_client_others:.2f} | {per_client_others / per_client_greedy:.2f}x "
          f"(ITL: {g['itl_p50'] / others['itl_p50']:.2f}x) | "
          f"{others['itl_p50'] * 1000:.1f} ms | {others['itl_p90'] * 1000:.1f} ms | {others['errors']} |")
    print(f"| the {GRAMMAR_CLIENTS} JSON-grammar clients | {constrained['output_tok_s']:.1f} | - | "
          f"{constrained['itl_p50'] * 1000:.1f} ms | {constrained['itl_p90'] * 1000:.1f} ms | "
          f"{constrained['errors']} ({invalid} invalid JSON of {constrained['requests']}) |")
    os.makedirs("bench/results", exist_ok=True)
    path = time.strftime("bench/results/sampling-%Y%m%d-%H%M%S.json")
    with open(path, "w") as f:
        json.dump({"model": args.model_id, "dtype": dtype, "step_ms": steps, "greedy": g, "sampled": s,
                   "grammar_others": others,
                   "grammar_clients": constrained, "invalid_json": invalid}, f, indent=2)
    print(f"\nraw figures: {path}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
