"""`tgserve serve --num-shard 2`: two gloo engine ranks give the greedy tokens of one shard (the
real default model against a one-shard server; a tiny one against transformers in float32, which
one shard equals); a split the heads do not allow is refused at start-up; a killed rank takes the
group down, reported by rank, with in-flight requests failed and no process left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

from conftest import TINY_SERVER_ARGS, build_tiny_llama
from models.families import check_served, served_greedy

pytestmark = pytest.mark.slow

SHARDS = ("--num-shard", "2")


def test_a_tiny_model_over_two_shards_equals_transformers(tmp_path, server_factory):
    """6 heads in 3 KV groups: ranks hold 4 and 2 (every architecture, in-process: tests/engine/test_sharded_engine.py)."""
    from models.test_llama_family import llama_3_groups

    folder = llama_3_groups(str(tmp_path / "model"))
    server = server_factory(folder, *TINY_SERVER_ARGS, *SHARDS)
    try:
        from tgserve.hardware import cpu_cores

        assert "float32 on cpu, 2 ranks" in server.logs()
        assert f"; {max(1, cpu_cores() // 2)} intra-op threads per rank" in server.logs()  # the host's cores, shared
        check_served(server, folder)
    finally:
        server.stop()


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "def fibonacci(n):", "The three primary colors are"]


def _greedy(server, n: int = 32) -> list[list[int]]:
    """The prompts at once (one batch), each's greedy tokens."""
    return served_greedy(server, PROMPTS, n)


def test_the_default_model_over_two_shards_equals_one_shard(smollm2_dir, smollm2_server, server_factory):
    """SmolLM2's 9 heads in 3 KV groups: ranks hold 6 and 3 heads."""
    sharded = server_factory(smollm2_dir, "--dtype", "float32", "--max-batch-total-tokens", "16384", *SHARDS)
    try:
        assert _greedy(sharded) == _greedy(smollm2_server)
    finally:
        sharded.stop()


def test_heads_that_cannot_be_split_are_a_clear_startup_error(tmp_path, server_factory):
    """3 heads sharing one KV head: neither whole groups nor equal shares of it go to 2 ranks."""
    folder = build_tiny_llama(str(tmp_path / "model"), hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    server = server_factory(folder, *TINY_SERVER_ARGS, *SHARDS, wait=False)
    assert server.proc.wait(120) == 1
    logs = server.logs()
    assert "3 attention heads with 1 key/value heads cannot be split over 2 ranks" in logs
    assert re.search(r"engine process \(rank [01] of 2\) exited with code 1", logs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone, only not yet reaped
        return f.read().split(") ")[-1][0] != "Z"


def test_killing_one_rank_mid_request_fails_it_and_stops_the_group(tiny_llama_dir, server_factory):
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS, *SHARDS)
    logs = server.logs()
    pids = {name: int(re.search(rf"{name} \(pid (\d+)\)", logs).group(1))
            for name in ("api", "engine", "engine rank 1 of 2")}
    body = {"inputs": "doomed", "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
    payloads = []
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                payloads.append(json.loads(line[5:]))
                if len(payloads) == 2:
                    os.kill(pids["engine rank 1 of 2"], signal.SIGKILL)
    assert len(payloads) < 400
    assert payloads[-1]["error_type"] == "generation", payloads[-1]
    assert payloads[-1]["error"].startswith("Request failed during generation: Server error:")
    assert server.proc.wait(60) == 1
    assert "engine process (rank 1 of 2) exited with code -9 (SIGKILL)" in server.logs()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if _alive(pid)], "processes left behind"
