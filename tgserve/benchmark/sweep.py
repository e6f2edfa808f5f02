"""`tgserve bench`: a concurrency sweep against the server, with transformers' own `generate` as the
baseline measured in the same run.

    tgserve bench                                   # start the server on the default model, sweep 1/16/32/64
    tgserve bench --url http://127.0.0.1:3000       # a server already running
    tgserve bench --concurrency 1,32 --max-new-tokens 64 --no-baseline
    tgserve bench --scenario seed                   # the seed's own load test (its k6 scenario) instead
    tgserve bench --peer llama.cpp                  # llama.cpp's llama-server too, same load, same run
    tgserve bench --peer llama.cpp --rounds 3       # each level three times per server, the median reported

Fixed prompts (chat-wrapped "write at length" requests) and a fixed output length (EOS ignored), so
every level does the same work per request. Shows progress while it runs, then prints a table
(output tok/s, ratios to the baselines, TTFT / ITL / latency percentiles) and where the engine's
step time went (its /metrics profile), and writes the figures as JSON and a PNG plot (tok/s and ITL
p50 against concurrency) into --output-dir. With --peer llama.cpp, llama.cpp's llama-server (built once
from the llama-cpp-python source package, tgserve/benchmark/peer.py) serves the same weights in the
same dtype with a slot per client of the largest level, beside tgserve for the whole sweep: each
level runs on tgserve, then on llama-server, so both see the machine at the same speed (the seed's
scenario runs after tgserve's); the table gives tgserve's ratio to it at each level. --rounds N
repeats every level N times per server, alternating which goes first, and reports the median round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

from tgserve.benchmark import peer
from tgserve.benchmark.loadgen import LoadResult, engine_profile, make_prompts, profile_row, profile_table, run_load
from tgserve.benchmark.servers import launch, stop
from tgserve.config import DEFAULT_MODEL_ID


def start_server(model_dir: str, dtype: str | None, port: int, extra: list[str], log_dir: str) -> subprocess.Popen:
    """`tgserve serve` on 127.0.0.1:port, returned once /health answers 200 (its log in log_dir)."""
    args = ["--dtype", dtype] if dtype else []
    os.makedirs(log_dir, exist_ok=True)
    return launch([sys.executable, "-m", "tgserve", "serve", "--model-id", model_dir, *args, "--port", str(port),
                   "--hostname", "127.0.0.1", *extra], port, os.path.join(log_dir, "tgserve-serve.log"), "tgserve serve")


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
        name = row.get("mode") or f"{row.get('server', 'tgserve')}, {row['concurrency']} clients"
        ttft, itl, itl90 = row.get("ttft_p50"), row.get("itl_p50"), row.get("itl_p90")
        lines.append(f"| {name} | {row['output_tok_s']:.1f} | "
                     + "".join(f"{row['output_tok_s'] / h:.2f}x | " for h in heads)
                     + f"{row['rps']:.2f} | {'%.3f s' % ttft if ttft is not None else '-'} | "
                     + f"{'%.1f ms' % (itl * 1000) if itl is not None else '-'} | "
                     + f"{'%.1f ms' % (itl90 * 1000) if itl90 is not None else '-'} | "
                     + f"{row['latency_p50']:.2f} s | {row.get('errors', 0)} |")
    return "\n".join(lines)


def peer_table(rows: list[dict], peer_rows: list[dict], peer: str) -> str:
    """tgserve against the peer, level by level: throughput ratio, ITL and TTFT p50 side by side."""
    lines = [f"| clients | tgserve tok/s | {peer} tok/s | ratio | ITL p50 tgserve / {peer} | "
             f"TTFT p50 tgserve / {peer} | TTFT ratio |", "|---" * 7 + "|"]
    theirs = {r["concurrency"]: r for r in peer_rows}
    for row in rows:
        other = theirs.get(row["concurrency"])
        if other is None:
            continue
        lines.append(f"| {row['concurrency']} | {row['output_tok_s']:.1f} | {other['output_tok_s']:.1f} | "
                     f"**{row['output_tok_s'] / other['output_tok_s']:.2f}x** | "
                     f"{row['itl_p50'] * 1000:.1f} / {other['itl_p50'] * 1000:.1f} ms | "
                     f"{row['ttft_p50']:.3f} / {other['ttft_p50']:.3f} s | {row['ttft_p50'] / other['ttft_p50']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], base: list[dict], path: str, title: str, peer_rows: list[dict] | None = None) -> None:
    """tok/s and ITL p50 against concurrency (the peer's too; the baselines as horizontal lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(levels, [r["output_tok_s"] for r in rows], "o-", label="tgserve")
    if peer_rows:
        peer = peer_rows[0]["server"]
        left.plot([r["concurrency"] for r in peer_rows], [r["output_tok_s"] for r in peer_rows], "s-",
                  color="tab:green", label=peer)
        right.plot([r["concurrency"] for r in peer_rows], [1000 * r["itl_p50"] for r in peer_rows], "s-",
                   color="tab:green", label=f"{peer} ITL p50")
        left.legend()
    for b in base:
        left.axhline(b["output_tok_s"], linestyle="--", color="gray", linewidth=1)
        left.annotate(f"transformers, {b['mode'].split(', ')[-1]}", (levels[0], b["output_tok_s"]),
                      textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
    left.set(xlabel="concurrent streaming clients", ylabel="output tokens/s", title="throughput")
    right.plot(levels, [1000 * r["itl_p50"] for r in rows], "o-", color="tab:orange", label="tgserve ITL p50")
    right.plot(levels, [1000 * r["itl_p90"] for r in rows], "o--", color="tab:red", label="tgserve ITL p90")
    right.set(xlabel="concurrent streaming clients", ylabel="ms", title="inter-token latency")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(levels)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Peer:
    """llama.cpp's llama-server (tgserve/benchmark/peer.py) on the same weights in the same dtype:
    built and converted once, started for a run, stopped after it."""

    def __init__(self, model_id: str, dtype: str, port: int, parallel: int):
        from tgserve.weights.locate import packaged_gguf

        gguf = packaged_gguf() if model_id == DEFAULT_MODEL_ID else model_id
        if not gguf or not gguf.endswith(".gguf"):
            raise SystemExit("--peer llama.cpp needs the model as a GGUF: the default model, or --model-id FILE.gguf")
        self.bin_dir = peer.build(say=lambda line: print(line, flush=True))
        self.gguf = peer.convert(self.bin_dir, gguf, dtype, say=lambda line: print(line, flush=True))
        self.port, self.parallel, self.proc = port, parallel, None

    def __enter__(self) -> str:
        print(f"starting llama-server ({os.path.basename(self.gguf)}, --parallel {self.parallel}, "
              f"{os.cpu_count()} threads) on port {self.port}...", flush=True)
        self.proc = peer.start(self.bin_dir, self.gguf, self.port, self.parallel, os.cpu_count() or 1)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        stop(self.proc)


def seed_scenario(args, model_dir: str, dtype: str) -> int:
    from tgserve.benchmark.seed import run_seed

    print(f"tgserve bench, the seed's load test: {args.model_id} ({dtype}), time scale {args.time_scale}",
          flush=True)
    peer = Peer(args.model_id, dtype, args.peer_port, 100) if args.peer else None
    server = None
    if args.url is None:
        print(f"starting tgserve serve on port {args.port}...", flush=True)
        server = start_server(model_dir, dtype, args.port, args.server_args.split(), args.output_dir)
    url = (args.url or f"http://127.0.0.1:{args.port}").rstrip("/")
    results = {}
    try:
        asyncio.run(run_load(url, ["warm-up"], 1, 2, 8))
        results["tgserve"] = asyncio.run(run_seed(url, args.time_scale,
                                                  progress=lambda line: print(line, flush=True)))
    finally:
        if server is not None:
            stop(server)
    if peer is not None:
        with peer as peer_url:
            asyncio.run(run_load(peer_url, ["warm-up"], 1, 2, 8, protocol="llama.cpp"))
            results[args.peer] = asyncio.run(run_seed(peer_url, args.time_scale, protocol="llama.cpp",
                                                      progress=lambda line: print(line, flush=True)))
    print("\n| | avg | min | med | max | p(90) | p(95) | RPS | failed |\n|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['avg']:.2f} s | {result['min']:.2f} s | {result['med']:.2f} s | "
              f"{result['max']:.2f} s | {result['p90']:.2f} s | {result['p95']:.2f} s | {result['rps']:.2f} | "
              f"{result['failures']} |")
    if peer is not None:
        print(f"\ntgserve / {args.peer} requests per second: "
              f"**{results['tgserve']['rps'] / results[args.peer]['rps']:.2f}x**")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"seed-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"model": args.model_id, "dtype": dtype, "time_scale": args.time_scale, **results["tgserve"],
                   "peers": {k: v for k, v in results.items() if k != "tgserve"}}, f, indent=2)
    print(f"\nfigures: {path}")
    return 1 if any(r["failures"] for r in results.values()) else 0


def sweep_levels(servers: list[tuple[str, str, str]], prompts: list[str], levels: list[int], args
                 ) -> tuple[dict[str, list[dict]], dict]:
    """Every server (name, url, protocol) at each level in turn, after a warm-up each: level by level,
    the servers one after the other, so that a drift in the machine's speed (this one's moves ±15%
    within minutes) lands on all of them alike; with --rounds N each level runs N times per server,
    the order reversed every other round (A B, B A, ...), and the round with the median throughput
    is reported (the lower middle one for an even count; every round's tok/s is kept under
    "rounds"). Returns each server's summary rows and tgserve's step profile per level (its /metrics)."""
    for name, url, protocol in servers:  # first-use costs are not a level's
        asyncio.run(run_load(url, prompts, 1, 2, 8, protocol=protocol))
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in servers}
    profiles = {}
    for c in levels:
        n = 8 if c == 1 else max(args.requests, c)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in servers}
        for round_ in range(args.rounds):
            for name, url, protocol in (servers if round_ % 2 == 0 else servers[::-1]):
                before = engine_profile(url) if protocol == "tgi" else {}
                label = f"{name}, {c} clients" + (f", round {round_ + 1}" if args.rounds > 1 else "")
                result = asyncio.run(run_load(url, prompts, c, n, args.max_new_tokens, protocol=protocol,
                                              on_result=Progress(label, n)))
                summary = {"server": name, **result.summary()}
                if protocol == "tgi":
                    summary["step_profile"] = profile_row(before, engine_profile(url))
                runs[name].append(summary)
        for name, done in runs.items():
            chosen = sorted(done, key=lambda r: r["output_tok_s"])[(len(done) - 1) // 2]
            if len(done) > 1:
                chosen = {**chosen, "rounds": [r["output_tok_s"] for r in done]}
            rows[name].append(chosen)
            if "step_profile" in chosen:
                profiles[f"{c} clients"] = chosen["step_profile"]
    return rows, profiles


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgserve bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="model to serve (and tokenize prompts with)")
    p.add_argument("--url", default=None, help="benchmark a server already running there instead of starting one")
    p.add_argument("--dtype", default=None, help="default: the server's default on this machine")
    p.add_argument("--concurrency", default="1,16,32,64", help="client counts, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least the level; 1 client runs 8)")
    p.add_argument("--rounds", type=positive, default=1,
                   help="run each level this many times per server (the order of the servers reversed every "
                        "other round) and report the round with the median throughput")
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
    p.add_argument("--peer", choices=["llama.cpp"], default=None,
                   help="also run the same load against llama.cpp's llama-server in the same run (built once "
                        "from the llama-cpp-python source package on PyPI, cached in ~/.cache/tgserve/llama.cpp; "
                        "the model re-quantized to the same dtype as a GGUF)")
    p.add_argument("--peer-port", type=int, default=3988, help="port of the peer server")
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

    peer = Peer(args.model_id, dtype, args.peer_port, max(levels)) if args.peer else None  # built before timing
    base = [] if args.no_baseline else baselines(model_dir, dtype, prompts, args.max_new_tokens,
                                                  args.hf_sequential, args.hf_batch)
    with contextlib.ExitStack() as running:  # both servers up for the whole sweep, stopped after it
        if args.url is None:
            print(f"starting tgserve serve on port {args.port}...", flush=True)
            running.callback(stop, start_server(model_dir, dtype, args.port, args.server_args.split(),
                                                args.output_dir))
        servers = [("tgserve", (args.url or f"http://127.0.0.1:{args.port}").rstrip("/"), "tgi")]
        if peer is not None:
            servers.append((args.peer, running.enter_context(peer), "llama.cpp"))
        by_server, profiles = sweep_levels(servers, prompts, levels, args)
    rows, peer_rows = by_server["tgserve"], by_server.get(args.peer, [])

    print("\n" + table(rows + peer_rows, base))
    if peer_rows:
        print(f"\ntgserve against {args.peer}, same run:")
        print(peer_table(rows, peer_rows, args.peer))
    if any(profiles.values()):
        print("\nwhere an engine step's time goes (ms per step; attention is inside the forward pass, \"forward\" "
              "is the rest of it; api_outputs is the API process's handling of the step's outputs):")
        print(profile_table(profiles))
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.output_dir, f"bench-{stamp}.json")
    with open(json_path, "w") as f:
        json.dump({"model": args.model_id, "dtype": dtype, "max_new_tokens": args.max_new_tokens,
                   "cores": os.cpu_count(), "baselines": base, "rows": rows, "peer_rows": peer_rows}, f, indent=2)
    png_path = os.path.join(args.output_dir, f"bench-{stamp}.png")
    plot(rows, base, png_path, f"{args.model_id} ({dtype}), {args.max_new_tokens} new tokens, "
                               f"{os.cpu_count()} cores", peer_rows)
    print(f"\nfigures: {json_path}\nplot: {png_path}")
    errors = sum(r["errors"] for r in rows + peer_rows)
    return 1 if errors else 0
