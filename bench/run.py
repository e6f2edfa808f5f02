"""Benchmark run: transformers baselines, then tgserve under 1/16/32/64 concurrent streaming clients.

    python -m bench.run                      # default model, the server's default dtype
    python -m bench.run --dtype bfloat16 --concurrency 1,16,32,64 --max-new-tokens 128

Prints a table with every figure as a ratio to the baselines measured in the same run, and
writes the raw figures to bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import torch

from bench import hf_baseline
from bench.loadgen import engine_profile, make_prompts, profile_row, profile_table, run_load
from tgserve import hardware
from tgserve.config import DEFAULT_MODEL_ID, ModelConfig
from tgserve.weights.locate import locate_model


def start_server(model_dir: str, dtype: str, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tgserve", "serve", "--model-id", model_dir, "--dtype", dtype,
                             "--port", str(port), "--hostname", "127.0.0.1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("server did not become healthy")


def fmt(row: dict, base_seq: float, base_batch: float) -> str:
    tok = row["output_tok_s"]
    itl = row.get("itl_p50")
    ttft = row.get("ttft_p50")
    return (f"| {row.get('mode', 'tgserve, %d clients' % row.get('concurrency', 0))} | {tok:7.1f} | "
            f"{tok / base_seq:5.2f}x | {tok / base_batch:5.2f}x | {row['rps']:5.2f} | "
            f"{'%.3f s' % ttft if ttft is not None else '-'} | {'%.1f ms' % (itl * 1000) if itl is not None else '-'} | "
            f"{row['latency_p50']:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    parser.add_argument("--dtype", default=None, help="default: the server's default on this machine")
    parser.add_argument("--concurrency", default="1,16,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (c=1 runs 8)")
    parser.add_argument("--hf-sequential", type=int, default=4, help="requests for the one-at-a-time baseline")
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--port", type=int, default=3987)
    parser.add_argument("--server-args", default="", help="extra flags for tgserve serve")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = args.dtype or hardware.default_dtype(hardware.default_device())
    model_dir = locate_model(ModelConfig(model_id=args.model_id))
    tokenizer, model = hf_baseline.load(model_dir, dtype)
    prompts = make_prompts(tokenizer)
    print(f"model {args.model_id} ({dtype}), {args.max_new_tokens} new tokens per request, "
          f"{torch.get_num_threads()} threads", flush=True)

    rows = [hf_baseline.one_at_a_time(tokenizer, model, prompts[:args.hf_sequential], args.max_new_tokens)]
    print(rows[-1], flush=True)
    rows.append(hf_baseline.static_batch(tokenizer, model, prompts[:args.hf_batch], args.max_new_tokens))
    print(rows[-1], flush=True)
    del model

    server = start_server(model_dir, dtype, args.port, args.server_args.split())
    try:
        url = f"http://127.0.0.1:{args.port}"
        asyncio.run(run_load(url, prompts, 1, 2, 8))  # warm-up
        profiles = {}
        for c in (int(x) for x in args.concurrency.split(",")):
            n = 8 if c == 1 else max(args.requests, c)
            before = engine_profile(url)
            summary = asyncio.run(run_load(url, prompts, c, n, args.max_new_tokens)).summary()
            summary["step_profile"] = profiles[f"{c} clients"] = profile_row(before, engine_profile(url))
            rows.append(summary)
            print(summary, flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)

    base_seq, base_batch = rows[0]["output_tok_s"], rows[1]["output_tok_s"]
    print(f"\n| run | output tok/s | vs transformers 1-at-a-time | vs transformers batch {args.hf_batch} | "
          "req/s | TTFT p50 | ITL p50 | latency p50 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(fmt(row, base_seq, base_batch))
    print("\nwhere an engine step's time goes (means per step; attention is inside the forward pass, "
          "\"forward\" is the rest of it; api_outputs is the API process's handling of the step's outputs):")
    print(profile_table(profiles))
    os.makedirs("bench/results", exist_ok=True)
    path = time.strftime("bench/results/%Y%m%d-%H%M%S.json")
    with open(path, "w") as f:
        json.dump({"model": args.model_id, "dtype": dtype, "max_new_tokens": args.max_new_tokens, "rows": rows}, f,
                  indent=2)
    print(f"\nraw figures: {path}")


if __name__ == "__main__":
    main()
