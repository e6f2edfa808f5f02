"""Serving behaviour over HTTP: health, info, overload, and KV blocks coming back after every end."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import TINY_SERVER_ARGS


def metric(server, name: str, labels: str = "") -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Poll a condition of the live server until it holds (or the deadline passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def all_blocks_free(server) -> bool:
    total = metric(server, "tgserve_kv_cache_total_blocks")
    return total > 0 and metric(server, "tgserve_kv_cache_free_blocks") == total and \
        metric(server, "tgi_batch_current_size") == 0 and metric(server, "tgi_queue_size") == 0


def test_health_is_200_with_empty_body_once_ready(tiny_server):
    for route in ("/health", "/"):
        r = httpx.get(tiny_server.url + route)
        assert r.status_code == 200 and r.content == b""


def test_info_reports_model_and_limits(tiny_server, tiny_llama_dir):
    info = httpx.get(tiny_server.url + "/info").json()
    assert info["model_id"] == tiny_llama_dir
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 511
    assert info["max_batch_total_tokens"] == 4096
    assert info["max_batch_prefill_tokens"] == 128
    assert info["max_concurrent_requests"] == 128
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert info["model_pipeline_tag"] == "text-generation"
    for key in ("max_best_of", "max_stop_sequences", "validation_workers", "version", "router", "sha",
                "docker_label", "model_sha", "max_client_batch_size"):
        assert key in info


def test_blocks_return_to_the_pool_after_a_burst(tiny_server):
    prompts = [f"request number {i} " * (1 + i % 5) for i in range(24)]

    def run(prompt):
        return httpx.post(tiny_server.url + "/generate", timeout=120,
                          json={"inputs": prompt, "parameters": {"max_new_tokens": 20 + len(prompt) % 17}}).status_code

    with ThreadPoolExecutor(24) as pool:
        assert set(pool.map(run, prompts)) == {200}
    assert wait_for(lambda: all_blocks_free(tiny_server))


def test_blocks_return_when_a_client_disconnects_mid_stream(tiny_server):
    dropped_before = metric(tiny_server, "tgi_request_failure", '{err="dropped"}')
    body = {"inputs": "a long one", "parameters": {"max_new_tokens": 500, "ignore_eos_token": True}}
    with httpx.stream("POST", tiny_server.url + "/generate_stream", json=body, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
            if len(events) == 3:
                break
    assert len(events) == 3 and events[-1]["generated_text"] is None  # left while it was still generating
    assert wait_for(lambda: all_blocks_free(tiny_server))
    assert wait_for(lambda: metric(tiny_server, "tgi_request_failure", '{err="dropped"}') == dropped_before + 1)


def test_blocks_return_when_a_client_of_generate_gives_up(tiny_server):
    body = {"inputs": "another long one", "parameters": {"max_new_tokens": 500, "ignore_eos_token": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/generate", json=body, timeout=0.3)
    assert wait_for(lambda: all_blocks_free(tiny_server))


@pytest.fixture(scope="module")
def small_server(tiny_llama_dir, server_factory):
    return server_factory(tiny_llama_dir, *TINY_SERVER_ARGS, "--max-concurrent-requests", "2")


def test_requests_past_max_concurrent_requests_get_429(small_server):
    """20 long requests at once against a limit of 2: the ones past the limit are refused at once."""
    body = {"inputs": "keep busy", "parameters": {"max_new_tokens": 500, "ignore_eos_token": True}}

    def send(i: int) -> httpx.Response:
        if i % 2:
            return httpx.post(small_server.url + "/generate", json=body, timeout=120)
        with httpx.stream("POST", small_server.url + "/generate_stream", json=body, timeout=120) as r:
            r.read()
            return r

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(send, range(20)))
    plain = [r for i, r in enumerate(responses) if i % 2]
    streams = [r for i, r in enumerate(responses) if not i % 2]
    overloaded = {"error": "Model is overloaded", "error_type": "overloaded"}
    refused = [r for r in plain if r.status_code == 429]
    refused_streams = [r for r in streams if r.text.startswith("data:{\"error\"")]
    assert refused or refused_streams
    assert all(r.json() == overloaded for r in refused)
    assert all(json.loads(r.text[5:]) == overloaded and r.status_code == 200 for r in refused_streams)
    assert len(refused) + len(refused_streams) <= 18  # at least the two admitted ones ran
    assert all(r.status_code == 200 for r in plain if r not in refused)
    assert wait_for(lambda: all_blocks_free(small_server))


def test_metrics_use_tgi_names(tiny_server):
    httpx.post(tiny_server.url + "/generate", json={"inputs": "count me", "parameters": {"max_new_tokens": 2}})
    httpx.post(tiny_server.url + "/generate", json={"inputs": ""})
    r = httpx.get(tiny_server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("tgi_request_count", "tgi_request_success", "tgi_queue_size", "tgi_batch_current_size",
                 "tgi_request_duration_count", "tgi_request_generated_tokens_bucket"):
        assert any(line.startswith(name + " ") or line.startswith(name + "{") for line in text.splitlines()), name
    assert metric(tiny_server, "tgi_request_failure", '{err="validation"}') >= 1
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert not [n for n in names if n.endswith(("_total", "_created"))]  # TGI's exporter adds no suffixes


def test_openapi_describes_the_tgi_routes(tiny_server):
    assert httpx.get(tiny_server.url + "/docs").status_code == 200
    spec = httpx.get(tiny_server.url + "/openapi.json").json()
    for route in ("/generate", "/generate_stream", "/", "/health", "/info", "/metrics"):
        assert route in spec["paths"], route
    assert "GenerateParameters" in spec["components"]["schemas"]
