"""TGI's generation routes on a live server over the tiny model: shapes, SSE framing, parameters."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


def stream_events(server, body: dict, route: str = "/generate_stream") -> list[dict]:
    """Parse an SSE response strictly: every event is one `data:` line followed by a blank line."""
    with httpx.stream("POST", server.url + route, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-compute-type"] == "cpu+optimized" and r.headers["x-accel-buffering"] == "no"
        raw = r.read().decode()
    chunks = raw.split("\n\n")
    assert chunks[-1] == "", "the stream must end with a complete event"
    events = []
    for chunk in chunks[:-1]:
        assert chunk.startswith("data:") and "\n" not in chunk, repr(chunk)
        events.append(json.loads(chunk[len("data:"):]))
    return events


GREEDY_LONG = {"max_new_tokens": 12, "ignore_eos_token": True, "details": True}


def test_generate_returns_completion_only_without_details_key(tiny_server):
    r = post(tiny_server, "/generate", {"inputs": "Hello world", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"generated_text"}
    assert isinstance(body["generated_text"], str)
    assert not body["generated_text"].startswith("Hello world")


def test_generate_details_have_tgi_fields(tiny_server):
    r = post(tiny_server, "/generate", {"inputs": "Hello world", "parameters": GREEDY_LONG})
    details = r.json()["details"]
    assert list(details) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 12 == len(details["tokens"])
    assert details["seed"] is None  # greedy
    assert details["prefill"] == []
    for token in details["tokens"]:
        assert set(token) == {"id", "text", "logprob", "special"}
        assert isinstance(token["id"], int) and token["logprob"] <= 0.0
    assert int(r.headers["x-generated-tokens"]) == 12
    assert r.headers["x-compute-type"] == "cpu+optimized"
    assert int(r.headers["x-prompt-tokens"]) > 0


def test_generated_text_is_the_decoded_tokens(tiny_server):
    body = post(tiny_server, "/generate", {"inputs": "The quick", "parameters": GREEDY_LONG}).json()
    tokens = body["details"]["tokens"]
    if not any(t["special"] for t in tokens):
        assert body["generated_text"] == "".join(t["text"] for t in tokens)


def test_sampling_reports_seed_and_same_seed_gives_same_tokens(tiny_server):
    params = {"max_new_tokens": 10, "do_sample": True, "seed": 1234, "details": True, "ignore_eos_token": True}
    a = post(tiny_server, "/generate", {"inputs": "Hello", "parameters": params}).json()
    b = post(tiny_server, "/generate", {"inputs": "Hello", "parameters": params}).json()
    assert a["details"]["seed"] == 1234
    assert [t["id"] for t in a["details"]["tokens"]] == [t["id"] for t in b["details"]["tokens"]]
    other = post(tiny_server, "/generate", {"inputs": "Hello", "parameters": {**params, "seed": 99}}).json()
    assert [t["id"] for t in other["details"]["tokens"]] != [t["id"] for t in a["details"]["tokens"]]


def test_sampling_without_seed_draws_and_reports_one(tiny_server):
    params = {"max_new_tokens": 3, "temperature": 0.7, "details": True}
    seed = post(tiny_server, "/generate", {"inputs": "Hello", "parameters": params}).json()["details"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64


def test_omitted_parameters_mean_sampling(tiny_server):
    """TGI: no `parameters` object at all samples; the response still carries no details."""
    a = post(tiny_server, "/generate", {"inputs": "Hello"})
    assert a.status_code == 200 and "generated_text" in a.json()


def test_compat_route_returns_a_list_with_full_text_by_default(tiny_server):
    r = post(tiny_server, "/", {"inputs": "Hello world", "parameters": {"max_new_tokens": 4}})
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["generated_text"].startswith("Hello world")
    plain = post(tiny_server, "/", {"inputs": "Hello world",
                                    "parameters": {"max_new_tokens": 4, "return_full_text": False}}).json()
    assert body[0]["generated_text"] == "Hello world" + plain[0]["generated_text"]


def test_stream_events_have_tgi_shape(tiny_server):
    events = stream_events(tiny_server, {"inputs": "Hello world", "parameters": GREEDY_LONG})
    assert len(events) == 12
    assert [e["index"] for e in events] == list(range(1, 13))
    for event in events[:-1]:
        assert set(event) == {"index", "token", "generated_text", "details"}
        assert event["generated_text"] is None and event["details"] is None
    last = events[-1]
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 12, "seed": None,
                               "input_length": last["details"]["input_length"]}
    assert last["details"]["input_length"] > 0
    reference = post(tiny_server, "/generate", {"inputs": "Hello world", "parameters": GREEDY_LONG}).json()
    assert last["generated_text"] == reference["generated_text"]
    assert [e["token"] for e in events] == reference["details"]["tokens"]


def test_compat_route_streams_when_asked(tiny_server):
    events = stream_events(tiny_server, {"inputs": "Hello", "stream": True,
                                         "parameters": {"max_new_tokens": 3, "details": True}}, route="/")
    assert 1 <= len(events) <= 3
    assert events[-1]["generated_text"].startswith("Hello")


def test_stream_without_details_has_null_details(tiny_server):
    events = stream_events(tiny_server, {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "ignore_eos_token": True}})
    assert events[-1]["details"] is None and events[-1]["generated_text"] is not None


def test_stop_sequence_ends_generation_and_keeps_the_stop_text(tiny_server):
    base = post(tiny_server, "/generate", {"inputs": "The quick", "parameters": {**GREEDY_LONG, "max_new_tokens": 20}}).json()
    text = base["generated_text"]
    stop = text[len(text) // 3: len(text) // 3 + 3]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    r = post(tiny_server, "/generate", {"inputs": "The quick",
                                        "parameters": {**GREEDY_LONG, "max_new_tokens": 20, "stop": [stop]}}).json()
    assert r["details"]["finish_reason"] == "stop_sequence"
    assert stop in r["generated_text"]
    assert r["generated_text"] == text[: len(r["generated_text"])]
    assert r["details"]["generated_tokens"] < 20


def test_truncate_keeps_the_last_tokens(tiny_server):
    events = stream_events(tiny_server, {"inputs": "The quick brown fox jumps over the lazy dog",
                                         "parameters": {"max_new_tokens": 1, "truncate": 3, "details": True}})
    assert events[-1]["details"]["input_length"] == 3


def test_max_new_tokens_defaults_to_the_rest_of_max_total_tokens(tiny_server):
    events = stream_events(tiny_server, {"inputs": "Hi", "parameters": {"ignore_eos_token": True, "details": True}})
    details = events[-1]["details"]
    assert details["input_length"] + details["generated_tokens"] == 512


def test_eos_ends_generation_with_eos_token_reason(tiny_server, tiny_llama_dir):
    """Find (in-process, with transformers) a prompt whose greedy continuation hits EOS, then ask the server."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for i in range(200):
        ids = tok(f"prompt {i}", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=60, do_sample=False)[0, ids.shape[1]:].tolist()
        if out[-1] == tok.eos_token_id:
            break
    else:
        pytest.fail("no prompt reaches EOS within 60 tokens on the tiny model")
    body = post(tiny_server, "/generate", {"inputs": f"prompt {i}", "parameters": {"max_new_tokens": 60, "details": True}}).json()
    assert body["details"]["finish_reason"] == "eos_token"
    assert [t["id"] for t in body["details"]["tokens"]] == out
    assert body["details"]["tokens"][-1]["special"]
    assert tok.eos_token not in body["generated_text"]  # special tokens are skipped in the text


def test_greedy_over_http_equals_transformers_alone_and_in_a_burst(tiny_server, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = ["Hello", "The quick brown fox jumps over the lazy dog. " * 3, "Paged attention",
               "Numbers 0123456789", "Unicode: caf\u00e9", "a", "Continuous batching serves many users at once.",
               "emoji \U0001f600 and more text to make this one longer than the others " * 2]
    n = 16
    expected = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=n, do_sample=False)  # both sides stop at EOS
        expected.append(out[0, ids.shape[1]:].tolist())

    def ids_of(prompt: str) -> list[int]:
        body = post(tiny_server, "/generate", {"inputs": prompt, "parameters": {
            "max_new_tokens": n, "details": True}}).json()
        return [t["id"] for t in body["details"]["tokens"]]

    assert [ids_of(p) for p in prompts] == expected
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ids_of, prompts)) == expected
