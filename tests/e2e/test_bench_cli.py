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
