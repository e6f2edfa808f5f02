"""OpenAI's routes on the tiny model: object shapes, streams, limits and errors in OpenAI's shape,
and agreement with TGI's door (same prompt, same greedy tokens)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world"}]


def post(server, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def stream(server, path: str, body: dict) -> list:
    """Every `data:` payload of a stream (the final "[DONE]" as a string)."""
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(x) if x != "[DONE]" else x for x in lines]


def chat(server, **fields) -> dict:
    return post(server, "/v1/chat/completions", {"model": "tgserve", "messages": MESSAGES, **fields})


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_completion_object_and_usage(tiny_server):
    body = chat(tiny_server, max_tokens=8, temperature=0)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["system_fingerprint"]
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] >= 1


def test_chat_is_the_rendered_prompt_through_the_same_engine_as_tgi(tiny_server):
    templated = post(tiny_server, "/chat_tokenize", {"messages": MESSAGES})["templated_text"]
    assert templated.endswith("<s>assistant\n")
    via_tgi = post(tiny_server, "/generate", {"inputs": templated, "parameters": {"max_new_tokens": 8,
                                                                                  "ignore_eos_token": True}})
    via_openai = chat(tiny_server, max_tokens=8, temperature=0)
    assert via_openai["choices"][0]["message"]["content"] == via_tgi["generated_text"]


def test_greedy_chat_is_deterministic_across_identical_requests(tiny_server):
    a = chat(tiny_server, max_tokens=10, temperature=0)
    b = chat(tiny_server, max_tokens=10, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_chat_stream_framing_and_equality_with_the_plain_response(tiny_server):
    plain = chat(tiny_server, max_tokens=10, temperature=0)["choices"][0]
    events = stream(tiny_server, "/v1/chat/completions",
                    {"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunks = [c for c in chunks if c["usage"] is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1]["choices"] == []
    choice_chunks = [c["choices"][0] for c in chunks[:-1]]
    assert [c["finish_reason"] for c in choice_chunks][:-1] == [None] * (len(choice_chunks) - 1)
    assert choice_chunks[-1]["finish_reason"] == plain["finish_reason"]
    assert "".join(c["delta"].get("content", "") for c in choice_chunks) == plain["message"]["content"]


def test_stream_without_include_usage_has_no_usage_field(tiny_server):
    events = stream(tiny_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert all("usage" not in c for c in events[:-1])


def test_stop_strings_are_cut_from_the_text_in_both_forms(tiny_server):
    full = chat(tiny_server, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    assert len(full) > 4
    stop = full[2:4]
    cut = chat(tiny_server, max_tokens=16, temperature=0, stop=stop)["choices"][0]
    assert cut["message"]["content"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    events = stream(tiny_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 16, "temperature": 0,
                                                          "stop": [stop]})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == cut["message"]["content"]


def test_n_choices_share_one_prompt_and_a_seed_repeats_them(tiny_server):
    a = chat(tiny_server, max_tokens=6, n=3, seed=7, temperature=1.0)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in a["choices"]}) > 1
    b = chat(tiny_server, max_tokens=6, n=3, seed=7, temperature=1.0)
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]
    greedy = chat(tiny_server, max_tokens=6, n=2, temperature=0)
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]


def test_logprobs_and_top_logprobs(tiny_server):
    body = chat(tiny_server, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 5
    for entry in content:
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert entry["bytes"] == list(entry["token"].encode())
    none = chat(tiny_server, max_tokens=5, temperature=0, logprobs=True, top_logprobs=0)
    assert all(e["top_logprobs"] == [] and e["logprob"] <= 0 for e in none["choices"][0]["logprobs"]["content"])


def test_logit_bias_forces_a_token(tiny_server):
    first = post(tiny_server, "/tokenize", {"inputs": " quick"})[0]
    body = chat(tiny_server, max_tokens=3, temperature=0, logit_bias={str(first["id"]): 100})
    assert body["choices"][0]["message"]["content"] == first["text"] * 3


SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 5},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["word", "n"]}
ARGS = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 3}}, "required": ["w"]}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": ARGS}},  # small: the tiny model's
         {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]  # context is 512


def test_response_format_json_schema_and_tgi_form(tiny_server):
    for fmt in ({"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}},
                {"type": "json_object", "value": SCHEMA}):
        body = chat(tiny_server, max_tokens=120, temperature=0, response_format=fmt)
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
    free = chat(tiny_server, max_tokens=40, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(free["choices"][0]["message"]["content"]), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "lookup"}}])
def test_tool_calls_come_back_valid_and_stream_the_same_arguments(tiny_server, tool_choice):
    body = chat(tiny_server, max_tokens=100, temperature=0, tools=TOOLS, tool_choice=tool_choice)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    if isinstance(tool_choice, dict):
        assert call["function"]["name"] == "lookup"
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, ARGS if call["function"]["name"] == "lookup" else {"type": "object"})
    events = stream(tiny_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 100, "temperature": 0,
                                                          "tools": TOOLS, "tool_choice": tool_choice})
    deltas = [d for c in events[:-1] for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == call["function"]["name"] and deltas[0]["id"].startswith("call_")
    assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_auto_gives_a_valid_call_or_a_plain_answer(tiny_server):
    for seed in range(3):
        choice = chat(tiny_server, max_tokens=100, temperature=1.0, seed=seed, tools=TOOLS)["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
        else:
            assert isinstance(choice["message"]["content"], str) and not choice["message"].get("tool_calls")


def test_tool_choice_none_answers_in_text(tiny_server):
    body = chat(tiny_server, max_tokens=5, temperature=0, tools=TOOLS, tool_choice="none")
    assert body["choices"][0]["message"]["content"] is not None and "tool_calls" not in body["choices"][0]["message"]


# ---- completions --------------------------------------------------------------------------------


def completion(server, status: int = 200, **fields) -> dict:
    return post(server, "/v1/completions", {"model": "tgserve", **fields}, status)


def test_completions_take_every_prompt_form(tiny_server):
    one = completion(tiny_server, prompt="Hello world", max_tokens=4, temperature=0)
    assert one["object"] == "text_completion" and one["id"].startswith("cmpl-")
    text = one["choices"][0]["text"]
    ids = [t["id"] for t in post(tiny_server, "/tokenize", {"inputs": "Hello world"})]
    assert completion(tiny_server, prompt=ids, max_tokens=4, temperature=0)["choices"][0]["text"] == text
    many = completion(tiny_server, prompt=["Hello world", "The quick"], max_tokens=4, temperature=0, n=2)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == many["choices"][1]["text"] == text
    lists = completion(tiny_server, prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c["text"] for c in lists["choices"]] == [text, text]
    assert many["usage"]["prompt_tokens"] == 2 * one["usage"]["prompt_tokens"] + 0 or many["usage"]["prompt_tokens"] > 0


def test_completions_default_to_16_tokens(tiny_server):
    body = completion(tiny_server, prompt="Hello world", temperature=0, max_tokens=None)
    assert body["usage"]["completion_tokens"] <= 16


def test_echo_and_legacy_logprobs(tiny_server):
    body = completion(tiny_server, prompt="Hello world", max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice = body["choices"][0]
    assert choice["text"].startswith("Hello world")
    lp = choice["logprobs"]
    n_prompt = body["usage"]["prompt_tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == choice["text"][:sum(len(t) for t in lp["tokens"])]
    assert lp["text_offset"][0] == 0 and all(b >= a for a, b in zip(lp["text_offset"], lp["text_offset"][1:]))
    assert all(len(d) <= 2 for d in lp["top_logprobs"][n_prompt:])


def test_completions_stream_equals_the_plain_text(tiny_server):
    plain = completion(tiny_server, prompt="Hello world", max_tokens=8, temperature=0)["choices"][0]
    events = stream(tiny_server, "/v1/completions", {"prompt": "Hello world", "max_tokens": 8, "temperature": 0,
                                                     "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    texts = [c["choices"][0] for c in events[:-2]]
    assert "".join(c["text"] for c in texts) == plain["text"]
    assert texts[-1]["finish_reason"] == plain["finish_reason"]


def test_best_of_returns_n_of_the_generated(tiny_server):
    body = completion(tiny_server, prompt="Hello world", max_tokens=4, best_of=3, n=2, temperature=1.0, seed=3)
    assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] >= 3


# ---- errors: OpenAI's shape and statuses, never a 500 ------------------------------------------

CHAT_ERRORS = [
    ({"temperature": 2.5}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
    ({"n": 129}, "n"), ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": []}, "messages"), ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "regex", "value": "(abc"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": "hello"}, "messages"), ({"temperature": "hot"}, "temperature"),
]


@pytest.mark.parametrize("fields,param", CHAT_ERRORS)
def test_chat_errors_are_400_in_openai_shape(tiny_server, fields, param):
    body = post(tiny_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, **fields}, 400)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_context_length_exceeded_has_its_code(tiny_server):
    body = post(tiny_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 600}, 400)
    assert body["error"]["code"] == "context_length_exceeded" and "maximum context length is 512" in body["error"]["message"]


@pytest.mark.parametrize("fields,status,param", [
    ({"suffix": "x"}, 422, "suffix"), ({"logprobs": 6}, 400, "logprobs"), ({"best_of": 1, "n": 2}, 400, "best_of"),
    ({"best_of": 3, "n": 1, "stream": True}, 400, "best_of"), ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 999999]]}, 400, "prompt"), ({"max_tokens": 1000}, 400, "prompt"),
    ({"prompt": ["a", "b", "c", "d", "e"]}, 422, "prompt"),  # TGI's --max-client-batch-size (4)
])
def test_completion_errors(tiny_server, fields, status, param):
    body = completion(tiny_server, status, **{"prompt": "Hello", **fields})
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_invalid_json_on_openai_routes_is_400_in_openai_shape(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# ---- models, tokenize, invocations, metrics, OpenAPI ----------------------------------------------


def test_models_lists_the_served_model_with_its_length(tiny_server):
    body = httpx.get(tiny_server.url + "/v1/models").json()
    [card] = body["data"]
    assert body["object"] == "list" and card["object"] == "model" and card["max_model_len"] == 512


def test_tokenize_gives_ids_texts_and_byte_offsets(tiny_server):
    text = "caf\u00e9 fox"
    tokens = post(tiny_server, "/tokenize", {"inputs": text})
    raw = text.encode()
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len(raw)  # byte offsets: "é" is two bytes
    assert all(t["text"] == raw[t["start"]:t["stop"]].decode(errors="replace") for t in tokens)
    assert any(t["text"] == "\u00e9" or "\u00e9" in t["text"] for t in tokens)
    assert len(post(tiny_server, "/tokenize", {"inputs": text, "parameters": {"truncate": 2}})) == 2


def test_invocations_serves_all_three_bodies(tiny_server):
    assert post(tiny_server, "/invocations", {"messages": MESSAGES, "max_tokens": 2})["object"] == "chat.completion"
    assert post(tiny_server, "/invocations", {"prompt": "Hello", "max_tokens": 2})["object"] == "text_completion"
    tgi = post(tiny_server, "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert isinstance(tgi, list) and "generated_text" in tgi[0]


def test_metrics_count_requests_per_route_and_show_kv_usage(tiny_server):
    chat(tiny_server, max_tokens=1)
    text = httpx.get(tiny_server.url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith('tgserve_request_count{route="/v1/chat/completions"}'))
    assert int(line.split()[-1]) >= 1
    assert any(x.startswith("tgserve_kv_cache_usage_ratio ") for x in text.splitlines())


def test_openapi_describes_the_openai_routes_with_their_schemas(tiny_server):
    spec = httpx.get(tiny_server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/chat_tokenize",
                 "/invocations"):
        assert path in spec["paths"], path
    chat_op = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert chat_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletion")
    assert "ErrorResponse" in json.dumps(chat_op["responses"]["400"])


def test_openapi_gives_the_tgi_routes_their_response_schemas(tiny_server):
    spec = httpx.get(tiny_server.url + "/openapi.json").json()
    ok = {path: json.dumps(spec["paths"][path][method]["responses"]["200"])
          for path, method in (("/generate", "post"), ("/generate_stream", "post"), ("/info", "get"),
                               ("/tokenize", "post"), ("/chat_tokenize", "post"), ("/v1/completions", "post"),
                               ("/v1/models", "get"))}
    for path, name in (("/generate", "GenerateResponse"), ("/generate_stream", "StreamResponse"), ("/info", "Info"),
                       ("/tokenize", "TokenizedToken"), ("/chat_tokenize", "ChatTokenizeResponse"),
                       ("/v1/completions", "Completion"), ("/v1/models", "ModelList")):
        assert name in ok[path], path
