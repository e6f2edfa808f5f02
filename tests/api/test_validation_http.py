"""Every validation rule through HTTP, on each route that takes TGI's parameters: status 422,
`error_type` validation and TGI's message on /generate and POST /; one SSE error event (status
200) on /generate_stream. Limits are the tiny server's (max_total 512, max_input 511, best_of 2,
4 stop sequences, top_n 5) or, for the rules that need other limits, a tight server's."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import TINY_SERVER_ARGS

PREFIX = "Input validation error: "

RULES = [
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": -1.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": -2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 600}, "`truncate` must be strictly positive and less than 511. Given: 600"),
    ({"max_new_tokens": 600}, "`inputs` tokens + `max_new_tokens` must be <= 512. Given: 4 `inputs` tokens and "
                              "600 `max_new_tokens`"),
    ({"grammar": {"type": "json", "value": {"type": "object"}}},
     "grammar is not valid: Grammar must have a 'properties' field"),
    ({"grammar": {"type": "json", "value": {"properties": {"a": {"type": "nosuchtype"}}}}},
     "grammar is not valid: 'nosuchtype' is not valid under any of the given schemas"),
]
# rules of requests that cannot stream (checked on the plain routes only)
PLAIN_ONLY = [
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2, "do_sample": True, "seed": 5}, "`seed` must not be set when `best_of` > 1"),
]
STREAM_ONLY = [
    ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
    ({"decoder_input_details": True}, "`decoder_input_details` == true is not supported when streaming tokens"),
]
INPUTS = "Hello world"  # 4 tokens with the tiny tokenizer


def expect_422(server, route: str, parameters: dict, message: str, inputs: str = INPUTS) -> None:
    body = {"inputs": inputs, "parameters": parameters}
    if route == "/":
        body["stream"] = False
    r = httpx.post(server.url + route, json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json() == {"error": PREFIX + message, "error_type": "validation"}


def expect_sse_error(server, route: str, parameters: dict, message: str, inputs: str = INPUTS) -> None:
    body = {"inputs": inputs, "parameters": parameters}
    if route == "/":
        body["stream"] = True
    with httpx.stream("POST", server.url + route, json=body, timeout=60) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    assert raw.count("data:") == 1, raw
    assert json.loads(raw.strip()[len("data:"):]) == {"error": PREFIX + message, "error_type": "validation"}


@pytest.mark.parametrize("route", ["/generate", "/"])
@pytest.mark.parametrize("parameters,message", RULES + PLAIN_ONLY)
def test_every_rule_is_a_422_with_tgi_message(tiny_server, route, parameters, message):
    expect_422(tiny_server, route, parameters, message)


@pytest.mark.parametrize("route", ["/generate_stream", "/"])
@pytest.mark.parametrize("parameters,message", RULES + STREAM_ONLY)
def test_every_rule_is_one_sse_error_event_on_streams(tiny_server, route, parameters, message):
    expect_sse_error(tiny_server, route, parameters, message)


def test_a_grammar_the_library_rejects_is_a_422_naming_the_problem(tiny_server):
    r = httpx.post(tiny_server.url + "/generate", timeout=60,
                   json={"inputs": INPUTS, "parameters": {"grammar": {"type": "regex", "value": "(abc"}}})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error.startswith(PREFIX + "grammar is not valid: ") and "unclosed group" in error


@pytest.mark.parametrize("grammar", [{"type": "xml", "value": "a"}, {"type": "regex"}, {"value": "a"},
                                     {"type": "regex", "value": 5}])
def test_a_malformed_grammar_object_is_a_body_error(tiny_server, grammar):
    r = httpx.post(tiny_server.url + "/generate", timeout=60, json={"inputs": INPUTS, "parameters": {"grammar": grammar}})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith(("Failed to deserialize the JSON body", PREFIX + "grammar is not supported"))


@pytest.fixture(scope="module")
def tight_server(tiny_llama_dir, server_factory):
    return server_factory(tiny_llama_dir, *TINY_SERVER_ARGS, "--max-input-tokens", "8", "--max-best-of", "1",
                          "--disable-grammar-support")


LONG_INPUT = "The quick brown fox jumps over the lazy dog."  # more than 8 tokens


@pytest.mark.parametrize("parameters,message,inputs", [
    ({"max_new_tokens": 4}, "`inputs` must have less than 8 tokens. Given: ", LONG_INPUT),
    ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not allowed for this endpoint", INPUTS),
    ({"grammar": {"type": "regex", "value": "a+"}}, "grammar is not supported", INPUTS),
])
def test_rules_that_depend_on_launcher_limits(tight_server, parameters, message, inputs):
    r = httpx.post(tight_server.url + "/generate", json={"inputs": inputs, "parameters": parameters}, timeout=60)
    assert r.status_code == 422
    assert r.json()["error"].startswith(PREFIX + message)
    assert r.json()["error_type"] == "validation"


def test_truncate_lets_a_long_input_through(tight_server):
    r = httpx.post(tight_server.url + "/generate", timeout=60,
                   json={"inputs": LONG_INPUT, "parameters": {"max_new_tokens": 2, "truncate": 8, "details": True}})
    assert r.status_code == 200
    assert r.headers["x-prompt-tokens"] == "8"


def test_lengths_are_checked_before_the_grammar_as_in_tgi(tiny_server):
    r = httpx.post(tiny_server.url + "/generate", timeout=60, json={
        "inputs": INPUTS, "parameters": {"max_new_tokens": 600, "grammar": {"type": "regex", "value": "(abc"}}})
    assert r.status_code == 422
    assert "`inputs` tokens + `max_new_tokens` must be <= 512" in r.json()["error"]
