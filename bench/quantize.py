"""Each --quantize method against bfloat16 on one model, all in one run.

    python -m bench.quantize                       # the default model (SmolLM2-135M), every method
    python -m bench.quantize --methods int8 int4   # bf16 is always the baseline row

Every row is our engine in-process (`create_engine`, the server's path, bf16 activations), so
the columns compare methods, not code paths:
  linear MB     bytes of the tensors the tensor-parallel linears hold (quantized buffers, scales,
                the oneDNN-packed bf16 weight); the LM head and embeddings are never quantized;
  load MB       peak resident growth while `load_model` runs, in a fresh process (the full-precision
                copy of a layer lives only until its last part is loaded);
  greedy        the first 32 greedy tokens of 8 chat prompts against bf16's: the fraction before the
                first divergence (mean over prompts), and the fraction of equal positions overall;
  ppl           perplexity of a fixed text, teacher-forced (prompt logprobs through the engine,
                prefill in chunks of 256 tokens);
  ms/token      median decode step with one sequence;
  tok/s @32     32 sequences decoding together: 32 / median step.
Timings are taken in interleaved rounds (every method once per round, best round kept), so drift
on a shared machine touches every row alike. A float32 row (not a method: the same engine in
float32) shows how far bf16's own rounding moves greedy tokens and perplexity: the scale against
which the methods' agreement reads.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch

METHODS = ["int8", "int4", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"]
QUESTIONS = [
    "What is the capital of France, and what is it famous for?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "How does a refrigerator keep food cold?",
    "What are the main differences between cats and dogs as pets?",
    "Summarize the story of Romeo and Juliet in a few sentences.",
    "Why is the sky blue?",
]
TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "experimented with two-wheeled machines that riders pushed along with their feet. These early "
    "designs were heavy and uncomfortable, yet they showed that a person could balance on two wheels "
    "in a line. Over the following decades, engineers added pedals, chains and gears, and the frame "
    "became lighter and stronger. By the end of the century, the safety bicycle, with two wheels of "
    "equal size and a chain driving the rear wheel, had become popular in many countries. It gave "
    "ordinary people a cheap and fast way to travel, and it changed how cities grew. Women in "
    "particular found new freedom in cycling, and the fashion of the time changed to allow it. "
    "Today, bicycles are used for commuting, sport and leisure. Many cities build separate lanes to "
    "keep cyclists safe from cars, and some offer shared bicycles that anyone can rent for a short "
    "trip. Electric bicycles, which add a small motor to help the rider, have made longer journeys "
    "and steep hills easier. Researchers continue to study how cycling affects health, traffic and "
    "the environment, and most conclude that more cycling would make cities quieter, cleaner and "
    "healthier places to live."
)
GREEDY_TOKENS, DECODE_STEPS, CONCURRENCY = 32, 48, 32



def linear_bytes(model) -> int:
    """Bytes of every tensor the linears hold (parameters, buffers, a oneDNN-packed weight)."""
    from tgserve.layers.linear import LinearBase

    total, seen = 0, set()
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def load_peak(model_dir: str, method: str | None, dtype: str) -> tuple[int, int]:
    """Resident growth at the peak of loading and once loaded (bench/load_memory.py's measure)."""
    from bench.load_memory import measure

    _, peak, kept, _ = measure(model_dir, dtype, quantize=method)[0]
    return peak, kept


def build(model_dir: str, method: str | None, dtype: str = "bfloat16"):
    from tgserve.config import CacheConfig, Config, ModelConfig, SchedulerConfig, ServerConfig
    from tgserve.engine.core import create_engine

    sections = dict(model=ModelConfig(path=model_dir, dtype=dtype, device="cpu", quantize=method),
                    server=ServerConfig(max_total_tokens=1024, max_input_tokens=1023),
                    scheduler=SchedulerConfig(max_batch_prefill_tokens=256),
                    cache=CacheConfig(max_batch_total_tokens=CONCURRENCY * 128 + 1024))
    try:  # one rank (the section exists where tensor-parallel serving does)
        from tgserve.config import ShardConfig

        sections["shard"] = ShardConfig(num_shard=1)
    except ImportError:
        pass
    config = Config(**sections)
    core, _ = create_engine(config)
    return core


def run(core, prompts: list[list[int]], new_tokens: int, **sampling) -> dict[str, object]:
    """Every prompt at once to completion: request id → its SeqOutputs merged."""
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    out: dict[str, dict] = {}
    for i, p in enumerate(prompts):
        core.scheduler.add(AddRequest(f"r{i}", p, SamplingParams(**sampling),
                                      StoppingParams(max_new_tokens=new_tokens, ignore_eos=True), time.time()))
        out[f"r{i}"] = {"tokens": [], "prompt_logprobs": []}
    while core.scheduler.has_work():
        for o in core.step().outputs:
            assert o.error is None, o.error
            out[o.request_id]["tokens"] += o.token_ids
            out[o.request_id]["prompt_logprobs"] += o.prompt_logprobs
    return [out[f"r{i}"] for i in range(len(prompts))]


def perplexity(core, ids: list[int]) -> float:
    logprobs = run(core, [ids], 1, prompt_logprobs=True)[0]["prompt_logprobs"]
    assert len(logprobs) == len(ids) - 1, (len(logprobs), len(ids))
    return math.exp(-sum(logprobs) / len(logprobs))


def decode_step_ms(core, prompts: list[list[int]]) -> float:
    """Median step once every sequence of `prompts` is decoding."""
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    for i, p in enumerate(prompts):
        core.scheduler.add(AddRequest(f"t{i}-{time.monotonic_ns()}", p, SamplingParams(),
                                      StoppingParams(max_new_tokens=DECODE_STEPS + 8, ignore_eos=True), time.time()))
    while core.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in core.scheduler.running):
        core.step()  # prefill (chunked), then every sequence decodes
    times = []
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    while core.scheduler.has_work():
        core.step()
    return statistics.median(times) * 1000


def agreement(tokens: list[list[int]], baseline: list[list[int]]) -> tuple[float, float]:
    prefix, equal = [], 0
    for t, b in zip(tokens, baseline):
        first = next((i for i, (x, y) in enumerate(zip(t, b)) if x != y), len(b))
        prefix.append(first / len(b))
        equal += sum(x == y for x, y in zip(t, b))
    return sum(prefix) / len(prefix), equal / sum(len(b) for b in baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=None, help="a model folder (default: the default model)")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--no-float32", action="store_true", help="skip the float32 reference row")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tgserve.config import ModelConfig
    from tgserve.weights.locate import locate_model

    model_dir = args.model_id or locate_model(ModelConfig())
    tok = AutoTokenizer.from_pretrained(model_dir)
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True)
             for q in QUESTIONS]
    chats = [list(c["input_ids"] if hasattr(c, "keys") else c) for c in chats]
    text_ids = tok(TEXT)["input_ids"]
    print(f"model {model_dir}, {torch.get_num_threads()} threads; perplexity text {len(text_ids)} tokens", flush=True)

    rows: dict[str, dict] = {}
    cores = {}
    runs = [("bfloat16", None, "bfloat16"), *((m, m, "bfloat16") for m in args.methods)]
    if not args.no_float32:
        runs.append(("float32 (ref.)", None, "float32"))
    for name, method, dtype in runs:
        peak, kept = load_peak(model_dir, method, dtype)
        core = build(model_dir, method, dtype)
        row = {"linear": linear_bytes(core.runner.model), "load_peak": peak, "load_kept": kept,
               "tokens": [r["tokens"] for r in run(core, chats, GREEDY_TOKENS)],
               "ppl": perplexity(core, text_ids), "ms": [], "batch_ms": []}
        rows[name], cores[name] = row, core
        print(f"  {name}: built, {row['linear'] / 2**20:.1f} MB of linears, ppl {row['ppl']:.3f}", flush=True)
    for r in range(args.rounds):
        for name, core in cores.items():
            rows[name]["ms"].append(decode_step_ms(core, chats[:1]))
            rows[name]["batch_ms"].append(decode_step_ms(core, [chats[i % len(chats)] for i in range(CONCURRENCY)]))
        print(f"  timing round {r + 1}/{args.rounds} done", flush=True)
        gc.collect()

    base = rows["bfloat16"]
    header = (f"{'method':<18}{'linear MB':>10}{'load MB':>9}{'greedy prefix':>14}{'greedy equal':>13}"
              f"{'ppl':>9}{'ms/token':>10}{'tok/s @1':>10}{f'tok/s @{CONCURRENCY}':>11}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, row in rows.items():
        prefix, equal = agreement(row["tokens"], base["tokens"])
        ms, batch = min(row["ms"]), min(row["batch_ms"])
        print(f"{name:<18}{row['linear'] / 2**20:>10.1f}{row['load_peak'] / 2**20:>9.0f}{prefix:>14.3f}{equal:>13.3f}"
              f"{row['ppl']:>9.3f}{ms:>10.2f}{1000 / ms:>10.1f}{CONCURRENCY * 1000 / batch:>11.1f}")
    print(f"\ngreedy: first {GREEDY_TOKENS} tokens of {len(chats)} chat prompts; ms/token: median decode step, "
          f"1 sequence; tok/s @{CONCURRENCY}: {CONCURRENCY} sequences decoding; best of {args.rounds} "
          "interleaved rounds")


if __name__ == "__main__":
    main()
