"""The baselines: transformers' own `generate`, one request at a time and as one static batch.

Same prompts, same dtype, same fixed output length (EOS suppressed with min_new_tokens), same
threads as the server gets, so the figures compare work for work.
"""

from __future__ import annotations

import time

import torch


def load(model_dir: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return tokenizer, model


@torch.inference_mode()
def one_at_a_time(tokenizer, model, prompts: list[str], max_new_tokens: int) -> dict:
    tokens, start = 0, time.perf_counter()
    latencies = []
    for prompt in prompts:
        t = time.perf_counter()
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
        tokens += out.shape[1] - ids.input_ids.shape[1]
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {"mode": "transformers, one at a time", "requests": len(prompts), "output_tok_s": tokens / wall,
            "rps": len(prompts) / wall, "latency_p50": sorted(latencies)[len(latencies) // 2]}


@torch.inference_mode()
def static_batch(tokenizer, model, prompts: list[str], max_new_tokens: int) -> dict:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * len(prompts)
    return {"mode": f"transformers, static batch of {len(prompts)}", "requests": len(prompts),
            "output_tok_s": tokens / wall, "rps": len(prompts) / wall, "latency_p50": wall}
