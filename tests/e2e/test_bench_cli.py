"""`tgserve bench`: a concurrency sweep that shows progress, prints its table and the engine's step
profile, and writes the figures as JSON and a PNG plot — against a running server, and starting
its own with transformers' baselines in the same run."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_SERVER_ARGS, free_port

pytestmark = pytest.mark.slow


def bench(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tgserve", "bench", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def outputs(folder: str) -> tuple[dict, bytes]:
    [json_path] = glob.glob(os.path.join(folder, "bench-*.json"))
    [png_path] = glob.glob(os.path.join(folder, "bench-*.png"))
    with open(json_path) as f, open(png_path, "rb") as g:
        return json.load(f), g.read()


def test_a_sweep_against_a_running_server(tiny_llama_dir, server_factory, tmp_path):
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS)
    out = str(tmp_path / "results")
    run = bench("--model-id", tiny_llama_dir, "--url", server.url, "--concurrency", "1,3", "--requests", "6",
                "--max-new-tokens", "5", "--no-baseline", "--output-dir", out, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 clients: 6/6 requests, 30 tokens" in run.stdout  # progress
    assert "| tgserve, 3 clients |" in run.stdout and "| 3 clients |" in run.stdout  # table and profile
    figures, png = outputs(out)
    assert [r["concurrency"] for r in figures["rows"]] == [1, 3]
    assert [r["requests"] for r in figures["rows"]] == [8, 6] and all(r["errors"] == 0 for r in figures["rows"])
    assert all(r["output_tok_s"] > 0 and r["step_profile"]["steps"] > 0 for r in figures["rows"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_rounds_run_each_level_again_and_report_the_median_round(tiny_llama_dir, server_factory, tmp_path):
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS)
    out = str(tmp_path / "results")
    run = bench("--model-id", tiny_llama_dir, "--url", server.url, "--concurrency", "2", "--requests", "4",
                "--max-new-tokens", "4", "--rounds", "3", "--no-baseline", "--output-dir", out, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(f"tgserve, 2 clients, round {i}: 4/4 requests" in run.stdout for i in (1, 2, 3))
    figures, _ = outputs(out)
    [row] = figures["rows"]
    assert len(row["rounds"]) == 3 and row["output_tok_s"] == sorted(row["rounds"])[1]
    refused = bench("--url", server.url, "--rounds", "0", cwd=str(tmp_path))
    assert refused.returncode == 2 and "--rounds: must be at least 1" in refused.stderr


def test_a_sweep_that_starts_its_server_and_measures_the_baselines(tiny_llama_dir, tmp_path):
    out = str(tmp_path / "results")
    run = bench("--model-id", tiny_llama_dir, "--dtype", "float32", "--port", str(free_port()),
                "--server-args", " ".join(TINY_SERVER_ARGS[2:]), "--concurrency", "2", "--requests", "2",
                "--max-new-tokens", "4", "--hf-sequential", "1", "--hf-batch", "2", "--output-dir", out,
                cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    figures, png = outputs(out)
    assert [b["mode"] for b in figures["baselines"]] == ["transformers, one at a time",
                                                         "transformers, static batch of 2"]
    assert figures["rows"][0]["requests"] == 2 and figures["dtype"] == "float32"
    assert "vs transformers, static batch of 2" in run.stdout
    assert png.startswith(b"\x89PNG")


def test_bench_is_listed_and_has_its_own_help(tmp_path):
    top = subprocess.run([sys.executable, "-m", "tgserve", "--help"], capture_output=True, text=True, timeout=60)
    assert "bench" in top.stdout
    own = bench("--help", cwd=str(tmp_path))
    assert own.returncode == 0 and "--concurrency" in own.stdout and "--url" in own.stdout


def test_the_seeds_load_test_shrunk_in_time(tiny_llama_dir, server_factory, tmp_path):
    """Its full shape (ramp to 50 and 100 virtual users and down, 7 requests each with think time)
    at 1/100 of its time; every request answered."""
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS)
    out = str(tmp_path / "results")
    run = bench("--model-id", tiny_llama_dir, "--url", server.url, "--scenario", "seed", "--time-scale", "0.01",
                "--output-dir", out, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    [path] = glob.glob(os.path.join(out, "seed-*.json"))
    with open(path) as f:
        result = json.load(f)
    assert result["failures"] == 0 and result["requests"] >= 7 and result["requests"] % 7 == 0
    assert result["min"] <= result["med"] <= result["p90"] <= result["max"] and result["rps"] > 0
    assert "| tgserve |" in run.stdout


FAKE_LLAMA = os.path.join(os.path.dirname(__file__), "fake_llama_server.py")


def fake_llama_cpp(tmp_path) -> tuple[dict, str]:
    """A cached 'build' of llama.cpp whose tools are the stand-in (tests/e2e/fake_llama_server.py):
    the environment pointing `--peer llama.cpp` at it, and the log of what it was asked."""
    bin_dir = tmp_path / "llama.cpp" / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("llama-server", "llama-quantize"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_LLAMA} {tool} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    log = str(tmp_path / "fake-llama.log")
    return {**os.environ, "TGSERVE_LLAMA_CPP_DIR": str(tmp_path / "llama.cpp"), "FAKE_LLAMA_LOG": log}, log


def logged(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_sweep_beside_llama_cpp(smollm2_server, tmp_path):
    """--peer llama.cpp: the model's GGUF converted to the run's dtype by llama-quantize, llama-server
    started with a slot per client of the largest level, the same requests (greedy, EOS ignored,
    fixed length) streamed from its /completion, each level run on both servers in turn (twice here,
    the order reversed), and the same-run comparison printed and saved."""
    env, log = fake_llama_cpp(tmp_path)
    out = str(tmp_path / "results")
    run = subprocess.run([sys.executable, "-m", "tgserve", "bench", "--url", smollm2_server.url, "--peer", "llama.cpp",
                          "--peer-port", str(free_port()), "--dtype", "bfloat16", "--concurrency", "1,3",
                          "--requests", "6", "--max-new-tokens", "5", "--no-baseline", "--rounds", "2",
                          "--output-dir", out],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    entries = logged(log)
    quantize = next(e["argv"] for e in entries if e.get("tool") == "llama-quantize")
    assert quantize[0] == "--allow-requantize" and quantize[1].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert quantize[3] == "BF16"
    server_argv = next(e["argv"] for e in entries if e.get("tool") == "llama-server")
    assert server_argv[server_argv.index("--parallel") + 1] == "3"
    assert server_argv[server_argv.index("-m") + 1].endswith("SmolLM2-135M-Instruct.BF16.gguf")
    bodies = [e["request"] for e in entries if "request" in e]
    assert len(bodies) == 2 + 2 * (8 + 6)  # warm-up, then two rounds of 1 client (8 requests) and 3 clients
    # level by level, the two servers side by side, the order reversed in the second round
    order = [run.stdout.index(f"{name}, {c} clients, round {r}: {n}/{n}")
             for c, n in ((1, 8), (3, 6)) for name, r in (("tgserve", 1), ("llama.cpp", 1), ("llama.cpp", 2),
                                                           ("tgserve", 2))]
    assert order == sorted(order)
    assert all(b["stream"] and b["ignore_eos"] and b["temperature"] == 0.0 for b in bodies)
    assert {b["n_predict"] for b in bodies[2:]} == {5}
    figures, png = outputs(out)
    assert [(r["server"], r["concurrency"], r["requests"]) for r in figures["peer_rows"]] == [
        ("llama.cpp", 1, 8), ("llama.cpp", 3, 6)]
    assert all(r["output_tok_s"] > 0 and r["itl_p50"] > 0 for r in figures["peer_rows"])
    assert "tgserve against llama.cpp, same run:" in run.stdout and "| llama.cpp, 3 clients |" in run.stdout
    assert png.startswith(b"\x89PNG")


def test_the_seeds_load_test_beside_llama_cpp(smollm2_server, tmp_path):
    """The seed's requests sent to llama-server as it asks for them: sampled ones with top-p and the
    seed (llama.cpp's own top-k / min-p filters off), greedy ones at temperature 0; both reported."""
    env, log = fake_llama_cpp(tmp_path)
    out = str(tmp_path / "results")
    run = subprocess.run([sys.executable, "-m", "tgserve", "bench", "--url", smollm2_server.url, "--peer", "llama.cpp",
                          "--peer-port", str(free_port()), "--dtype", "bfloat16", "--scenario", "seed",
                          "--time-scale", "0.01", "--output-dir", out],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    bodies = [e["request"] for e in logged(log) if "request" in e and not e["request"]["stream"]]
    sampled = [b for b in bodies if b["temperature"] != 0.0]
    assert sampled and all(b["top_p"] == 0.9 and b["top_k"] == 0 and b["min_p"] == 0.0 and b["seed"] == 0
                           for b in sampled)
    assert len(bodies) - len(sampled) >= 2 * len(bodies) // 7 - 2 and not any(b["ignore_eos"] for b in bodies)
    [path] = glob.glob(os.path.join(out, "seed-*.json"))
    with open(path) as f:
        result = json.load(f)
    assert result["failures"] == 0 and result["peers"]["llama.cpp"]["failures"] == 0
    assert result["peers"]["llama.cpp"]["requests"] >= 7
    assert "| llama.cpp |" in run.stdout and "tgserve / llama.cpp requests per second" in run.stdout


def test_the_real_llama_server_when_it_is_built(tmp_path):
    """Where `tgserve bench --peer llama.cpp` has built llama.cpp on this machine (it takes minutes, so
    tests never build it), the load generator's llama.cpp client against the real server: every
    token of a fixed-length greedy request arrives as its own event."""
    import asyncio

    from tgserve.benchmark import peer
    from tgserve.benchmark.loadgen import run_load
    from tgserve.benchmark.servers import stop

    bin_dir = os.path.join(peer.cache_dir(), "build", "bin")
    model = glob.glob(os.path.join(peer.cache_dir(), "models", "*.BF16.gguf"))
    if not os.access(os.path.join(bin_dir, "llama-server"), os.X_OK) or not model:
        pytest.skip("llama.cpp is not built here (tgserve bench --peer llama.cpp builds it)")
    server = peer.start(bin_dir, model[0], free_port(), 2, 2)
    try:
        url = f"http://127.0.0.1:{server.args[server.args.index('--port') + 1]}"
        result = asyncio.run(run_load(url, ["Tell me a story.", "Why is the sky blue?"], 2, 4, 12,
                                      protocol="llama.cpp"))
    finally:
        stop(server)
    assert [r.error for r in result.results] == [None] * 4
    assert [r.tokens for r in result.results] == [12] * 4 and all(len(r.itls) == 11 for r in result.results)
    assert all(r.text for r in result.results)


def test_the_gpu_check_runs_its_plumbing_on_the_cpu(tmp_path):
    """bench/gpu_check.py end to end at its tiny shape on the CPU (the real check needs an NVIDIA GPU):
    greedy float32 tokens equal transformers' through the graphs' padded inputs (run eagerly here) and
    eager steps, and the speed figures of both are written."""
    out = tmp_path / "gpu-check.json"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--shape", "tiny",
                          "--streams", "4", "--new-tokens", "6", "--output", str(out)],
                         capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(out.read_text())
    equality = figures["equality"]
    assert equality["equal_graphs"] == equality["equal_eager"] == equality["sequences"] == 6
    for mode in ("graphs", "eager"):
        assert figures[mode]["one_stream_ms"] > 0 and figures[mode]["many_streams_tok_s"] > 0
    assert 0 < figures["graphs"]["one_stream_replay_ms"] and "one_stream_replay_ms" not in figures["eager"]
    assert figures["streams"] == 4
    assert "greedy float32 vs transformers: 6/6 sequences equal with CUDA graphs, 6/6 eager" in run.stdout


def test_the_gpu_check_says_when_there_is_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 2 and "needs an NVIDIA GPU" in run.stdout
