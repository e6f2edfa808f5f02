"""Bad input gets TGI's error shape and status, on plain and streaming routes; the server survives."""

from __future__ import annotations

import json

import httpx
import pytest

from tgserve.api.errors import ValidationError
from tgserve.api.schemas_tgi import GenerateParameters
from tgserve.api.validate import check_parameters, normalise_grammar
from tgserve.config import ServerConfig

CFG = ServerConfig(max_input_tokens=100, max_total_tokens=200)

# (parameters, message after "Input validation error: ") in TGI's wording
BAD_PARAMETERS = [
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"temperature": -1.0}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"top_k": -3}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 100. Given: 0"),
    ({"truncate": 101}, "`truncate` must be strictly positive and less than 100. Given: 101"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
]

BAD_GRAMMARS = [
    ({"type": "json", "value": {"type": "object"}}, "grammar is not valid: Grammar must have a 'properties' field"),
    ({"type": "json", "value": "{not json"},
     "grammar is not valid: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ({"type": "json", "value": 5}, "grammar is not supported"),
    ({"type": "json", "value": {"properties": {"a": {"type": "nosuchtype"}}}},
     "grammar is not valid: 'nosuchtype' is not valid under any of the given schemas"),
    ({"type": "json", "value": {"properties": {"a": {"minLength": -1}}}},
     "grammar is not valid: -1 is less than the minimum of 0"),
    ({"type": "json_schema", "value": {"name": "x"}}, "grammar is not valid: `json_schema` needs a `schema` object"),
]


@pytest.mark.parametrize("grammar,message", BAD_GRAMMARS)
def test_grammar_rules_give_tgi_messages(grammar, message):
    with pytest.raises(ValidationError) as e:
        normalise_grammar(GenerateParameters(grammar=grammar).grammar, CFG)
    assert e.value.message == message


def test_json_schema_grammars_are_normalised_to_one_kind():
    for grammar in ({"type": "json", "value": {"properties": {}}}, {"type": "json_object", "value": '{"properties": {}}'},
                    {"type": "json_schema", "value": {"name": "x", "schema": {"properties": {}}}}):
        spec = normalise_grammar(GenerateParameters(grammar=grammar).grammar, CFG)
        assert spec.kind == "json_schema" and json.loads(spec.value) == {"properties": {}}


@pytest.mark.parametrize("params,message", BAD_PARAMETERS)
def test_check_parameters_gives_tgi_messages(params, message):
    with pytest.raises(ValidationError) as e:
        check_parameters(GenerateParameters(**params), "hello", stream=False, cfg=CFG)
    assert e.value.message == message
    assert e.value.body() == {"error": "Input validation error: " + message, "error_type": "validation"}


def test_empty_inputs_are_refused():
    with pytest.raises(ValidationError, match="`inputs` cannot be empty"):
        check_parameters(GenerateParameters(), "", stream=False, cfg=CFG)


def test_streams_refuse_best_of_and_decoder_input_details():
    with pytest.raises(ValidationError, match="not supported when streaming tokens"):
        check_parameters(GenerateParameters(best_of=2, do_sample=True), "x", stream=True, cfg=CFG)
    with pytest.raises(ValidationError, match="`decoder_input_details` == true is not supported when streaming"):
        check_parameters(GenerateParameters(decoder_input_details=True), "x", stream=True, cfg=CFG)


def test_default_values_are_accepted():
    """What TGI's clients send by default (null, false, 1.0) must pass."""
    check_parameters(GenerateParameters(watermark=False, decoder_input_details=False, repetition_penalty=1.0,
                                        frequency_penalty=0.0, top_n_tokens=0, best_of=1), "x", stream=False, cfg=CFG)


def test_best_of_is_refused_when_the_server_allows_only_one():
    with pytest.raises(ValidationError, match="`best_of` != 1 is not allowed for this endpoint"):
        check_parameters(GenerateParameters(best_of=2, do_sample=True), "x", stream=False,
                         cfg=ServerConfig(max_input_tokens=10, max_total_tokens=20, max_best_of=1))


def test_grammar_is_refused_when_support_is_disabled():
    with pytest.raises(ValidationError, match="^grammar is not supported$"):
        normalise_grammar(GenerateParameters(grammar={"type": "regex", "value": "a+"}).grammar,
                          ServerConfig(max_input_tokens=10, max_total_tokens=20, disable_grammar_support=True))


# ---- over HTTP ------------------------------------------------------------------------------------


def test_validation_error_is_422_in_tgi_shape(tiny_server):
    r = httpx.post(tiny_server.url + "/generate", json={"inputs": "x", "parameters": {"top_k": 0}})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: `top_k` must be strictly positive", "error_type": "validation"}


def test_prompt_longer_than_max_input_tokens_is_422(tiny_server):
    r = httpx.post(tiny_server.url + "/generate", json={"inputs": "hello " * 600, "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 422
    message = r.json()["error"]
    assert message.startswith("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 512. Given: ")


def test_input_plus_max_new_tokens_over_max_total_is_422(tiny_server):
    r = httpx.post(tiny_server.url + "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 600}})
    assert r.status_code == 422
    assert "`inputs` tokens + `max_new_tokens` must be <= 512" in r.json()["error"]


@pytest.mark.parametrize("body", [
    {"inputs": 5}, {"parameters": {}}, {"inputs": "x", "parameters": {"max_new_tokens": "5"}},
    {"inputs": "x", "parameters": {"max_new_tokens": -1}}, {"inputs": "x", "parameters": {"do_sample": "yes"}},
    {"inputs": "x", "parameters": {"stop": "not-a-list"}}, {"inputs": ["a", "b"]},
])
def test_wrong_types_are_422_in_tgi_shape(tiny_server, body):
    r = httpx.post(tiny_server.url + "/generate", json=body)
    assert r.status_code == 422
    payload = r.json()
    assert payload["error_type"] == "validation"
    assert payload["error"].startswith("Failed to deserialize the JSON body into the target type: ")


def test_invalid_json_is_400_in_tgi_shape(tiny_server):
    r = httpx.post(tiny_server.url + "/generate", content=b'{"inputs": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"].startswith("Failed to parse the request body as JSON")


def test_stream_errors_are_one_sse_event_with_status_200(tiny_server):
    with httpx.stream("POST", tiny_server.url + "/generate_stream",
                      json={"inputs": "x", "parameters": {"temperature": 0}}) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    assert raw.count("data:") == 1 and raw.endswith("\n\n")
    assert json.loads(raw[len("data:"):]) == {
        "error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"}


def test_server_still_serves_after_bad_requests(tiny_server):
    for body in ({"inputs": ""}, {"inputs": 1}, {"inputs": "x", "parameters": {"top_p": 2}}):
        httpx.post(tiny_server.url + "/generate", json=body)
    r = httpx.post(tiny_server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200
    assert httpx.get(tiny_server.url + "/health").status_code == 200
