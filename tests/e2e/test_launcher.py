"""The launcher: clear start-up errors, clean shutdown that lets requests finish, a dead engine reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from conftest import TINY_SERVER_ARGS

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tgserve", *args], capture_output=True, text=True, timeout=timeout)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    result = run_cli("serve", "--model-id", str(tmp_path / "nothing-here"), "--port", "0")
    assert result.returncode == 2
    assert "not found" in result.stderr and "nothing-here" in result.stderr
    assert "Hugging Face cache" in result.stderr


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    result = run_cli("serve", "--model-id", str(tmp_path / "model.gguf"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_limits_that_cannot_work_are_refused_before_starting(tiny_llama_dir):
    result = run_cli("serve", "--model-id", tiny_llama_dir, "--max-input-tokens", "600", "--max-total-tokens", "500")
    assert result.returncode == 2 and "`max_input_tokens` must be < `max_total_tokens`" in result.stderr


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_cleanly(tiny_llama_dir, server_factory):
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS)
    body = {"inputs": "drain me", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
    events = []
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            if len(events) == 1:
                server.proc.send_signal(signal.SIGTERM)
    assert len(events) == 200 and events[-1]["generated_text"] is not None
    assert server.proc.wait(60) == 0
    assert "stopped" in server.logs()


def test_a_killed_engine_fails_in_flight_requests_and_the_launcher_exits(tiny_llama_dir, server_factory):
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS)
    body = {"inputs": "doomed", "parameters": {"max_new_tokens": 500, "ignore_eos_token": True}}
    payloads = []
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            payloads.append(json.loads(line[5:]))
            if len(payloads) == 2:
                os.kill(server.child_pid("engine"), signal.SIGKILL)
    assert payloads[-1] == {
        "error": "Request failed during generation: Server error: engine process exited with code -9 (SIGKILL)",
        "error_type": "generation",
    }
    assert server.proc.wait(60) == 1
    assert "engine process exited with code -9" in server.logs()


def test_an_engine_that_cannot_load_the_model_is_reported(tmp_path, server_factory):
    """Neither path serves it: no native class, and transformers has no causal LM for a ViT."""
    from transformers import ViTConfig

    folder = str(tmp_path / "unknown")
    ViTConfig(architectures=["NoSuchModelForCausalLM"]).save_pretrained(folder)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:  # a folder that looks like a model
        f.write(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    from conftest import build_tiny_tokenizer

    build_tiny_tokenizer(folder)
    server = server_factory(folder, "--max-total-tokens", "256", "--max-batch-total-tokens", "1024", wait=False)
    assert server.proc.wait(120) == 1
    logs = server.logs()
    assert "is not supported" in logs and "NoSuchModelForCausalLM" in logs
    assert "transformers cannot load it as a causal LM either" in logs
    assert "engine process exited with code 1" in logs


def test_help_lists_every_launcher_flag_with_its_env_var_and_default():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ("--model-id", "--revision", "--dtype", "--port", "--hostname", "--max-concurrent-requests",
                 "--max-input-tokens", "--max-total-tokens", "--max-batch-prefill-tokens",
                 "--max-batch-total-tokens", "--max-batch-size", "--waiting-served-ratio", "--max-waiting-tokens",
                 "--json-output"):
        assert flag in text
        env = flag[2:].replace("-", "_").upper()
        assert f"[env: {env}]" in text, env
    assert "[default: 3000]" in text and "[default: 128]" in text


def test_json_output_logs_json_lines(tmp_path):
    result = run_cli("serve", "--json-output", "--model-id", str(tmp_path / "absent"))
    assert result.returncode == 2
    entries = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert entries[-1]["level"] == "ERROR" and "not found" in entries[-1]["message"]


def _environ(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().split(b"\0")


def test_engine_ranks_ask_glibc_for_huge_pages_unless_the_user_chose_tunables(tiny_llama_dir, server_factory):
    """The engine's large allocations (weights, KV cache) go on transparent huge pages where the
    kernel allows it (README: memory); the API process is left as it is, and a GLIBC_TUNABLES the
    user set wins."""
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS)
    engine = server.child_pid("engine")
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in _environ(engine)
    assert not any(e.startswith(b"GLIBC_TUNABLES=") for e in _environ(server.child_pid("api")))
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read()
    if "[never]" not in thp:  # the kernel hands them out: the engine holds some
        with open(f"/proc/{engine}/smaps_rollup") as f:
            huge_kb = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
        assert huge_kb > 0
    server.stop()
    chosen = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS, env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=0" in _environ(chosen.child_pid("engine"))
