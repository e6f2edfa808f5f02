"""`tgserve bench`: a concurrency sweep against the server, with transformers' own `generate` as the
baseline measured in the same run.

    tgserve bench                                   # start the server on the default model, sweep 1/16/32/64
    tgserve bench --url http://127.0.0.1:3000       # a server already running
    tgserve bench --concurrency 1,32 --max-new-tokens 64 --no-baseline
    tgserve bench --scenario seed                   # the seed's own load test (its k6 scenario) instead

Fixed prompts (chat-wrapped "write at length" requests) and a fixed output length (EOS ignored), so
every level does the same work per request. Shows progress while it runs, then prints a table
(output tok/s, ratios to the baselines, TTFT / ITL / latency percentiles) and where the engine's
step time went (its /metrics profile), and writes the figures as JSON and a PNG plot (tok/s and ITL
p50 against concurrency) into --output-dir.
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

from tgserve.benchmark.loadgen import LoadResult, engine_profile, make_prompts, profile_row, profile_table, run_load
from tgserve.config import DEFAULT_MODEL_ID


def start_server(model_dir: str, dtype: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    """`tgserve serve` on 127.0.0.1:port, returned once /health answers 200."""
    args = ["--dtype", dtype] if dtype else []
    proc = subprocess.Popen([sys.executable, "-m", "tgserve", "serve", "--model-id", model_dir, *args,
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
    proc.kill()
    raise TimeoutError("server did not become healthy in 300 s")


class Progress:
    """One line every few seconds while a level runs: requests done, tokens, elapsed time."""

    def __init__(self, label: str, total: int, every: float = 2.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.monotonic()

    def __call__(self, result: LoadResult) -> None:
        now = time.monotonic()
        done = len(result.results)
        if now - self.last >= self.every or done == self.total:
            self.last = now
            tokens = sum(r.tokens for r in result.results)
            print(f"  {self.label}: {done}/{self.total} requests, {tokens} tokens, {now - self.start:.0f} s",
                  flush=True)


def baselines(model_dir: str, dtype: str, prompts: list[str], max_new_tokens: int, sequential: int,
              batch: int) -> list[dict]:
    """transformers `generate`: `sequential` requests one at a time, then `batch` as one static batch."""
    import torch

    from tgserve.benchmark import baseline

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer, model = baseline.load(model_dir, dtype)
    rows = []
    for label, run in (("one at a time", lambda: baseline.one_at_a_time(tokenizer, model, prompts[:sequential],
                                                                          max_new_tokens)),
                       (f"static batch of {batch}", lambda: baseline.static_batch(tokenizer, model, prompts[:batch],
                                                                                 max_new_tokens))):
        print(f"transformers baseline, {label}...", flush=True)
        rows.append(run())
    return rows


def table(rows: list[dict], base: list[dict]) -> str:
    heads = [b["output_tok_s"] for b in base]
    lines = ["| run | output tok/s | " + "".join(f"vs {b['mode']} | " for b in base)
             + "req/s | TTFT p50 | ITL p50 | ITL p90 | latency p50 | errors |",
             "|---" * (8 + len(base)) + "|"]
    for row in base + rows:
        name = row.get("mode") or f"tgserve, {row['concurrency']} clients"
        ttft, itl, itl90 = row.get("ttft_p50"), row.get("itl_p50"), row.get("itl_p90")
        lines.append(f"| {name} | {row['output_tok_s']:.1f} | "
                     + "".join(f"{row['output_tok_s'] / h:.2f}x | " for h in heads)
                     + f"{row['rps']:.2f} | {'%.3f s' % ttft if ttft is not None else '-'} | "
                     + f"{'%.1f ms' % (itl * 1000) if itl is not None else '-'} | "
                     + f"{'%.1f ms' % (itl90 * 1000) if itl90 is not None else '-'} | "
                     + f"{row['latency_p50']:.2f} s | {row.get('errors', 0)} |")
    return "\n".join(lines)


def plot(rows: list[dict], base: list[dict], path: str, title: str) -> None:
    """tok/s and ITL p50 against concurrency (the baselines as horizontal lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(levels, [r["output_tok_s"] for r in rows], "o-", label="tgserve")
    for b in base:
        left.axhline(b["output_tok_s"], linestyle="--", color="gray", linewidth=1)
        left.annotate(f"transformers, {b['mode'].split(', ')[-1]}", (levels[0], b["output_tok_s"]),
                      textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
    left.set(xlabel="concurrent streaming clients", ylabel="output tokens/s", title="throughput")
    right.plot(levels, [1000 * r["itl_p50"] for r in rows], "o-", color="tab:orange", label="ITL p50")
    right.plot(levels, [1000 * r["itl_p90"] for r in rows], "o--", color="tab:red", label="ITL p90")
    right.set(xlabel="concurrent streaming clients", ylabel="ms", title="inter-token latency")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(levels)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_scenario(args, model_dir: str, dtype: str) -> int:
    from tgserve.benchmark.seed import run_seed

    print(f"tgserve bench, the seed's load test: {args.model_id} ({dtype}), time scale {args.time_scale}",
          flush=True)
    server = None
    if args.url is None:
        print(f"starting tgserve serve on port {args.port}...", flush=True)
        server = start_server(model_dir, dtype, args.port, args.server_args.split())
    url = (args.url or f"http://127.0.0.1:{args.port}").rstrip("/")
    try:
        asyncio.run(run_load(url, ["warm-up"], 1, 2, 8))
        result = asyncio.run(run_seed(url, args.time_scale, progress=lambda line: print(line, flush=True)))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
    print("\n| | avg | min | med | max | p(90) | p(95) | RPS | failed |\n|---|---|---|---|---|---|---|---|---|")
    print(f"| tgserve | {result['avg']:.2f} s | {result['min']:.2f} s | {result['med']:.2f} s | {result['max']:.2f} s | "
          f"{result['p90']:.2f} s | {result['p95']:.2f} s | {result['rps']:.2f} | {result['failures']} |")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"seed-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"model": args.model_id, "dtype": dtype, "time_scale": args.time_scale, **result}, f, indent=2)
    print(f"\nfigures: {path}")
    return 1 if result["failures"] else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="model to serve (and tokenize prompts with)")
    p.add_argument("--url", default=None, help="benchmark a server already running there instead of starting one")
    p.add_argument("--dtype", default=None, help="default: the server's default on this machine")
    p.add_argument("--concurrency", default="1,16,32,64", help="client counts, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least the level; 1 client runs 8)")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers' generate baselines")
    p.add_argument("--hf-sequential", type=int, default=4, help="requests for the one-at-a-time baseline")
    p.add_argument("--hf-batch", type=int, default=32, help="size of the static-batch baseline")
    p.add_argument("--port", type=int, default=3987, help="port of the server this command starts")
    p.add_argument("--server-args", default="", help="extra flags for the server this command starts")
    p.add_argument("--output-dir", default="bench-results", help="where the JSON and PNG go")
    p.add_argument("--scenario", choices=["sweep", "seed"], default="sweep",
                   help="sweep: the concurrency sweep; seed: TGI's original k6 load test (100 virtual users, "
                        "4 minutes; see tgserve/benchmark/seed.py), reported like k6, no baseline or plot")
    p.add_argument("--time-scale", type=float, default=1.0, help="seed scenario: shrink its stages and think time")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers import AutoTokenizer

    from tgserve import hardware
    from tgserve.config import ModelConfig
    from tgserve.weights.locate import locate_model

    dtype = args.dtype or hardware.default_dtype(hardware.default_device())
    model_dir = locate_model(ModelConfig(model_id=args.model_id))
    if args.scenario == "seed":
        return seed_scenario(args, model_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"tgserve bench: {args.model_id} ({dtype}), {args.max_new_tokens} new tokens per request, "
          f"clients {levels}, {os.cpu_count()} cores", flush=True)

    base = [] if args.no_baseline else baselines(model_dir, dtype, prompts, args.max_new_tokens,
                                                  args.hf_sequential, args.hf_batch)
    server = None
    if args.url is None:
        print(f"starting tgserve serve on port {args.port}...", flush=True)
        server = start_server(model_dir, dtype, args.port, args.server_args.split())
    url = (args.url or f"http://127.0.0.1:{args.port}").rstrip("/")
    rows, profiles = [], {}
    try:
        asyncio.run(run_load(url, prompts, 1, 2, 8))  # warm-up: first-use costs are not a level's
        for c in levels:
            n = 8 if c == 1 else max(args.requests, c)
            before = engine_profile(url)
            result = asyncio.run(run_load(url, prompts, c, n, args.max_new_tokens,
                                          on_result=Progress(f"{c} clients", n)))
            summary = result.summary()
            summary["step_profile"] = profiles[f"{c} clients"] = profile_row(before, engine_profile(url))
            rows.append(summary)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(120)

    print("\n" + table(rows, base))
    if any(profiles.values()):
        print("\nwhere an engine step's time goes (ms per step; attention is inside the forward pass, \"forward\" "
              "is the rest of it; api_outputs is the API process's handling of the step's outputs):")
        print(profile_table(profiles))
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.output_dir, f"bench-{stamp}.json")
    with open(json_path, "w") as f:
        json.dump({"model": args.model_id, "dtype": dtype, "max_new_tokens": args.max_new_tokens,
                   "cores": os.cpu_count(), "baselines": base, "rows": rows}, f, indent=2)
    png_path = os.path.join(args.output_dir, f"bench-{stamp}.png")
    plot(rows, base, png_path, f"{args.model_id} ({dtype}), {args.max_new_tokens} new tokens, "
                               f"{os.cpu_count()} cores")
    print(f"\nfigures: {json_path}\nplot: {png_path}")
    errors = sum(r["errors"] for r in rows)
    return 1 if errors else 0
