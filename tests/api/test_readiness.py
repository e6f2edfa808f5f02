"""The API's view of the engine: /health is 503 until the engine says Ready, and a failed engine
fails requests with TGI's 424 instead of leaving them hanging. Driven over HTTP with the real app;
the engine's side of the socket is played by hand."""

from __future__ import annotations

import tempfile
import time

import pytest
import zmq
from fastapi.testclient import TestClient

from tgserve.api.app import create_app
from tgserve.api.tokenizer import Tokenizer
from tgserve.config import Config, ServerConfig
from tgserve.protocol import AddRequest, EngineFailed, Ready, decode_to_engine, encode, to_api_address, to_engine_address


@pytest.fixture
def app_and_engine(tiny_llama_dir):
    ipc_dir = tempfile.mkdtemp(prefix="tgserve-test-")
    config = Config(server=ServerConfig(max_input_tokens=100, max_total_tokens=200)).replace(ipc_dir=ipc_dir)
    app = create_app(config, Tokenizer(tiny_llama_dir))
    ctx = zmq.Context()
    to_api = ctx.socket(zmq.PUSH)
    from_api = ctx.socket(zmq.PULL)
    with TestClient(app) as client:  # the lifespan binds the API's sockets
        to_api.connect(to_api_address(ipc_dir))
        from_api.connect(to_engine_address(ipc_dir))
        yield client, to_api, from_api
    to_api.close(0)
    from_api.close(0)
    ctx.term()


def eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_health_is_503_until_the_engine_is_ready(app_and_engine):
    client, to_api, _ = app_and_engine
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    assert client.get("/info").json()["max_batch_total_tokens"] is None
    to_api.send(encode(Ready(num_blocks=10, block_size=16, max_batch_total_tokens=160, dtype="float32", device="cpu")))
    assert eventually(lambda: client.get("/health").status_code == 200)
    assert client.get("/info").json()["max_batch_total_tokens"] == 160


def test_a_failed_engine_fails_requests_with_424(app_and_engine):
    client, to_api, from_api = app_and_engine
    to_api.send(encode(Ready(num_blocks=10, block_size=16, max_batch_total_tokens=160, dtype="float32", device="cpu")))
    assert eventually(lambda: client.get("/health").status_code == 200)

    def fail_engine_once_request_arrives():
        assert from_api.poll(10000), "the request never reached the engine's socket"
        assert isinstance(decode_to_engine(from_api.recv()), AddRequest)
        to_api.send(encode(EngineFailed("engine process exited with code -9")))

    import threading

    threading.Thread(target=fail_engine_once_request_arrives).start()
    r = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 424
    assert r.json() == {"error": "Request failed during generation: Server error: engine process exited with code -9",
                        "error_type": "generation"}
    assert client.get("/health").status_code == 503
    again = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 5}})
    assert again.status_code == 424  # refused at once, not queued forever
