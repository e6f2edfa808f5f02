"""OpenAI's own Python client (`openai`, from its own virtualenv) against the real SmolLM2: every
call's content is checked, greedy text against transformers' generate on the same weights, streams
against the same request unstreamed, logprobs against transformers' log-softmax, tool calls and
structured output against their JSON schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.e2e.clients import check_top_logprobs, client_python, error, ok, reference, run_client

pytestmark = pytest.mark.slow

HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]  # runs to max_tokens
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]  # stops at EOS
COLORS = [{"role": "user", "content": "Name three colors."}]
WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
PROMPT = "The history of the printing press begins"
PROMPTS = ["Once upon a time, in a small village,", "def fibonacci(n):"]
CHAT_TOKENS, COMPLETION_TOKENS, SAMPLED_TOKENS = 20, 12, 10
LOGPROB_TOLERANCE = 2e-3

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a timezone.",
                                      "parameters": TIME_PARAMETERS}},
]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "country": {"type": "string", "maxLength": 20}},
               "required": ["city", "country"]}

CLIENT_SCRIPT = r'''
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="x", max_retries=0, timeout=300)
HAIKU, FRANCE, COLORS, WEATHER, PROMPT, PROMPTS, TOOLS, CITY_SCHEMA, CHAT_TOKENS, COMPLETION_TOKENS, SAMPLED_TOKENS = \
    json.loads(sys.argv[2])
chat, complete = client.chat.completions.create, client.completions.create

def dump(response):
    return response.model_dump(mode="json")

def stream(make, **kw):
    return lambda: [dump(chunk) for chunk in make(stream=True, **kw)]

def once(make, **kw):
    return lambda: dump(make(**kw))

greedy = dict(model="smollm2", temperature=0)
sampled_n = dict(model="smollm2", messages=HAIKU, max_tokens=SAMPLED_TOKENS, temperature=1.0, seed=1234, n=2)
sampled = dict(model="smollm2", messages=COLORS, max_tokens=SAMPLED_TOKENS, temperature=0.8, seed=7)
required = dict(greedy, messages=WEATHER, max_tokens=60, tools=TOOLS, tool_choice="required")
fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY_SCHEMA}}
run({
    "chat": once(chat, messages=HAIKU, max_tokens=CHAT_TOKENS, **greedy),
    "chat_stream": stream(chat, messages=HAIKU, max_tokens=CHAT_TOKENS, stream_options={"include_usage": True},
                          **greedy),
    "chat_eos": once(chat, messages=FRANCE, max_tokens=CHAT_TOKENS, **greedy),
    "chat_eos_stream": stream(chat, messages=FRANCE, max_tokens=CHAT_TOKENS, **greedy),
    "chat_stop": once(chat, messages=FRANCE, max_tokens=CHAT_TOKENS, stop=[" Paris"], **greedy),
    "chat_stop_stream": stream(chat, messages=FRANCE, max_tokens=CHAT_TOKENS, stop=[" Paris"], **greedy),
    "chat_max_completion_tokens": once(chat, messages=HAIKU, max_completion_tokens=5, **greedy),
    "models": lambda: dump(client.models.list()),
    "completion": once(complete, prompt=PROMPT, max_tokens=COMPLETION_TOKENS, **greedy),
    "completions": once(complete, prompt=PROMPTS, max_tokens=COMPLETION_TOKENS, **greedy),
    "completions_stream": stream(complete, prompt=PROMPTS, max_tokens=COMPLETION_TOKENS,
                                 stream_options={"include_usage": True}, **greedy),
    "completion_logprobs": once(complete, prompt=PROMPT, max_tokens=6, logprobs=2, **greedy),
    "n_greedy": once(chat, messages=FRANCE, max_tokens=SAMPLED_TOKENS, n=2, **greedy),
    "n_seeded": once(chat, **sampled_n),
    "n_seeded_again": once(chat, **sampled_n),
    "n_seeded_stream": stream(chat, **sampled_n),
    "sampled": once(chat, **sampled),
    "sampled_again": once(chat, **sampled),
    "sampled_stream": stream(chat, **sampled),
    "logprobs": once(chat, messages=HAIKU, max_tokens=CHAT_TOKENS, logprobs=True, top_logprobs=3, **greedy),
    "logprobs_stream": stream(chat, messages=HAIKU, max_tokens=CHAT_TOKENS, logprobs=True, top_logprobs=3, **greedy),
    "logprobs_chosen": once(chat, messages=FRANCE, max_tokens=CHAT_TOKENS, logprobs=True, top_logprobs=0, **greedy),
    "logprobs_too_many": once(chat, messages=FRANCE, max_tokens=2, logprobs=True, top_logprobs=21, **greedy),
    "tool_required": once(chat, **required),
    "tool_required_stream": stream(chat, **required),
    "tool_named": once(chat, **dict(required, tool_choice={"type": "function", "function": {"name": "get_time"}})),
    "json_schema": once(chat, messages=FRANCE, max_tokens=40, response_format=fmt, **greedy),
})
'''


@pytest.fixture(scope="module")
def ref(smollm2_dir):
    return reference(smollm2_dir)


@pytest.fixture(scope="module")
def results(smollm2_server):
    python = client_python("TGSERVE_OPENAI_PYTHON", ".venv-openai/bin/python")
    inputs = [HAIKU, FRANCE, COLORS, WEATHER, PROMPT, PROMPTS, TOOLS, CITY_SCHEMA, CHAT_TOKENS, COMPLETION_TOKENS,
              SAMPLED_TOKENS]
    return run_client(python, CLIENT_SCRIPT, smollm2_server.url, args=[json.dumps(inputs)])


def choice_chunks(chunks: list[dict]) -> list[dict]:
    return [c for c in chunks if c["choices"]]


def streamed_content(chunks: list[dict], index: int = 0) -> str:
    return "".join(ch["delta"]["content"] or "" for c in chunks for ch in c["choices"] if ch["index"] == index)


def streamed_text(chunks: list[dict], index: int) -> str:
    return "".join(ch["text"] for c in chunks for ch in c["choices"] if ch["index"] == index)


def finish_reasons(chunks: list[dict], index: int = 0) -> list[str]:
    return [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["index"] == index and ch["finish_reason"]]


def usage_of(greedy) -> dict:
    return {"prompt_tokens": len(greedy.prompt_ids), "completion_tokens": len(greedy.ids),
            "total_tokens": len(greedy.prompt_ids) + len(greedy.ids)}


def check_usage(usage: dict, expected: dict, eos: bool) -> None:
    """Counted as the tokens generated; whether the closing EOS counts is the server's choice."""
    assert usage["prompt_tokens"] == expected["prompt_tokens"]
    allowed = {expected["completion_tokens"], expected["completion_tokens"] - 1} if eos \
        else {expected["completion_tokens"]}
    assert usage["completion_tokens"] in allowed
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# ---- chat ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,messages", [("chat", HAIKU), ("chat_eos", FRANCE)], ids=["length", "eos"])
def test_greedy_chat_equals_transformers_generate(results, ref, name, messages):
    expected = ref.greedy_chat(messages, CHAT_TOKENS)
    response = ok(results, name)
    (choice,) = response["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected.text
    assert choice["finish_reason"] == expected.finish_reason
    assert response["object"] == "chat.completion"
    check_usage(response["usage"], usage_of(expected), expected.eos)


@pytest.mark.parametrize("name", ["chat", "chat_eos"], ids=["length", "eos"])
def test_chat_stream_concatenates_to_the_unstreamed_reply(results, name):
    response, chunks = ok(results, name), ok(results, name + "_stream")
    with_choices = choice_chunks(chunks)
    assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert streamed_content(chunks) == response["choices"][0]["message"]["content"]
    # one finish_reason, on the last chunk that has a choice
    assert finish_reasons(chunks) == [response["choices"][0]["finish_reason"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] == response["choices"][0]["finish_reason"]


def test_stop_strings_cut_the_reply_streamed_or_not(results, ref):
    expected = ref.greedy_chat(FRANCE, CHAT_TOKENS)
    assert " Paris" in expected.text
    (choice,) = ok(results, "chat_stop")["choices"]
    assert choice["message"]["content"] == expected.text[:expected.text.index(" Paris")]
    assert choice["finish_reason"] == "stop"
    chunks = ok(results, "chat_stop_stream")
    assert streamed_content(chunks) == choice["message"]["content"]
    assert finish_reasons(chunks) == ["stop"]


def test_max_completion_tokens_limits_the_reply_like_max_tokens(results, ref):
    expected = ref.greedy_chat(HAIKU, 5)
    response = ok(results, "chat_max_completion_tokens")
    assert response["choices"][0]["message"]["content"] == expected.text
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 5


def test_models_lists_the_served_model(results):
    (model,) = ok(results, "models")["data"]
    assert model["id"] == ok(results, "chat")["model"] and model["object"] == "model"


def test_include_usage_adds_exactly_one_usage_chunk_with_no_choices_at_the_end(results):
    response, chunks = ok(results, "chat"), ok(results, "chat_stream")
    usage = [c for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []
    assert usage[0]["usage"] == response["usage"]
    assert all(c.get("usage") is None for c in chunks[:-1])
    # without stream_options no chunk carries usage
    assert all(c.get("usage") is None for c in ok(results, "chat_eos_stream"))


# ---- completions -------------------------------------------------------------------------------------


def test_completion_of_a_string_prompt_equals_transformers_generate(results, ref):
    expected = ref.greedy(PROMPT, COMPLETION_TOKENS, add_special_tokens=True)
    response = ok(results, "completion")
    (choice,) = response["choices"]
    assert choice["index"] == 0 and choice["text"] == expected.text
    assert choice["finish_reason"] == expected.finish_reason
    assert response["object"] == "text_completion"
    check_usage(response["usage"], usage_of(expected), expected.eos)


def test_completion_of_a_list_of_prompts_answers_each_at_its_index(results, ref):
    expected = [ref.greedy(p, COMPLETION_TOKENS, add_special_tokens=True) for p in PROMPTS]
    response = ok(results, "completions")
    choices = sorted(response["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == [e.text for e in expected]
    assert [c["finish_reason"] for c in choices] == [e.finish_reason for e in expected]
    usage = response["usage"]
    assert usage["prompt_tokens"] == sum(len(e.prompt_ids) for e in expected)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_stream_of_a_list_of_prompts_concatenates_per_index(results):
    response, chunks = ok(results, "completions"), ok(results, "completions_stream")
    by_index = {c["index"]: c for c in response["choices"]}
    for index, choice in by_index.items():
        assert streamed_text(chunks, index) == choice["text"]
        assert finish_reasons(chunks, index) == [choice["finish_reason"]]
    usage = [c for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["choices"] == [] and usage[0]["usage"] == response["usage"]


def test_legacy_completion_logprobs_are_transformers_log_softmax(results, ref):
    expected = ref.greedy(PROMPT, 6, add_special_tokens=True)
    (choice,) = ok(results, "completion_logprobs")["choices"]
    assert choice["text"] == expected.text
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == expected.text
    rows = ref.log_softmax(expected.prompt_ids, expected.ids)
    assert logprobs["token_logprobs"] == pytest.approx([float(rows[i, t]) for i, t in enumerate(expected.ids)],
                                                       abs=LOGPROB_TOLERANCE)
    for i, (token, top) in enumerate(zip(logprobs["tokens"], logprobs["top_logprobs"])):
        assert len(top) == 2 and top[token] == pytest.approx(logprobs["token_logprobs"][i], abs=1e-6)
        assert sorted(top.values(), reverse=True) == pytest.approx(rows[i].topk(2).values.tolist(),
                                                                   abs=LOGPROB_TOLERANCE)
    assert logprobs["text_offset"][0] == len(PROMPT)


# ---- n and seeds ----------------------------------------------------------------------------------------


def test_greedy_n_gives_identical_choices_equal_to_transformers(results, ref):
    expected = ref.greedy_chat(FRANCE, SAMPLED_TOKENS)
    choices = ok(results, "n_greedy")["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1]
    assert [c["message"]["content"] for c in choices] == [expected.text] * 2
    assert [c["finish_reason"] for c in choices] == [expected.finish_reason] * 2


def test_seeded_n_gives_two_samples_and_the_same_two_again(results):
    first, again = ok(results, "n_seeded"), ok(results, "n_seeded_again")
    texts = [c["message"]["content"] for c in sorted(first["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in sorted(first["choices"], key=lambda c: c["index"])] == [0, 1]
    assert texts == [c["message"]["content"] for c in sorted(again["choices"], key=lambda c: c["index"])]
    # each choice draws its own sample (deterministic for this seed, so this cannot flake)
    assert texts[0] != texts[1] and all(texts)
    chunks = ok(results, "n_seeded_stream")
    assert [streamed_content(chunks, i) for i in (0, 1)] == texts
    assert [len(finish_reasons(chunks, i)) for i in (0, 1)] == [1, 1]


def test_seeded_sampled_chat_is_reproducible_streamed_or_not(results, ref):
    first, again, chunks = ok(results, "sampled"), ok(results, "sampled_again"), ok(results, "sampled_stream")
    text = first["choices"][0]["message"]["content"]
    assert text and text == again["choices"][0]["message"]["content"]
    assert streamed_content(chunks) == text
    assert text != ref.greedy_chat(COLORS, SAMPLED_TOKENS).text  # it did sample (seed 7: not the greedy text)


# ---- logprobs ------------------------------------------------------------------------------------------


def test_chat_logprobs_are_transformers_log_softmax_with_sorted_top_3(results, ref):
    expected = ref.greedy_chat(HAIKU, CHAT_TOKENS)
    (choice,) = ok(results, "logprobs")["choices"]
    assert choice["message"]["content"] == expected.text
    content = choice["logprobs"]["content"]
    generated = [t for t in expected.ids if t not in ref.eos_ids]
    assert len(content) == len(generated)
    assert "".join(entry["token"] for entry in content) == expected.text
    rows = ref.log_softmax(expected.prompt_ids, expected.ids)
    for i, (entry, token) in enumerate(zip(content, generated)):
        assert entry["logprob"] == pytest.approx(float(rows[i, token]), abs=LOGPROB_TOLERANCE), i
        check_top_logprobs(ref, rows[i], entry["top_logprobs"], 3, LOGPROB_TOLERANCE)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-6)  # greedy: the best
        assert entry["bytes"] == list(entry["token"].encode())


def test_streamed_logprobs_equal_the_unstreamed_ones(results):
    """The same tokens and alternatives; values to float noise (each ran in a different batch)."""
    content = ok(results, "logprobs")["choices"][0]["logprobs"]["content"]
    streamed = [e for c in ok(results, "logprobs_stream") for ch in c["choices"] if ch["logprobs"]
                for e in ch["logprobs"]["content"] or []]
    assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in streamed] == \
        [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=LOGPROB_TOLERANCE)


def test_top_logprobs_0_still_returns_the_chosen_tokens_logprobs(results, ref):
    expected = ref.greedy_chat(FRANCE, CHAT_TOKENS)
    (choice,) = ok(results, "logprobs_chosen")["choices"]
    assert choice["message"]["content"] == expected.text
    content = choice["logprobs"]["content"]
    generated = [t for t in expected.ids if t not in ref.eos_ids]
    rows = ref.log_softmax(expected.prompt_ids, expected.ids)
    assert [e["logprob"] for e in content] == pytest.approx([float(rows[i, t]) for i, t in enumerate(generated)],
                                                             abs=LOGPROB_TOLERANCE)
    assert all(e["top_logprobs"] == [] for e in content)


def test_top_logprobs_over_20_is_a_bad_request(results):
    failure = error(results, "logprobs_too_many")
    assert failure["type"] == "BadRequestError" and failure["status"] == 400
    assert "top_logprobs" in failure["message"]


# ---- tools and structured output ---------------------------------------------------------------------------


def tool_call(response: dict) -> dict:
    (choice,) = response["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] in (None, "")
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    return call["function"]


def test_required_tool_call_arguments_validate_against_the_tools_schema(results):
    function = tool_call(ok(results, "tool_required"))
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[function["name"]]
    jsonschema.validate(json.loads(function["arguments"]), schema)


def test_named_tool_choice_calls_that_tool(results):
    function = tool_call(ok(results, "tool_named"))
    assert function["name"] == "get_time"
    jsonschema.validate(json.loads(function["arguments"]), TIME_PARAMETERS)


def test_streamed_tool_call_concatenates_to_the_unstreamed_arguments(results):
    function = tool_call(ok(results, "tool_required"))
    chunks = ok(results, "tool_required_stream")
    deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert deltas and deltas[0]["id"] and deltas[0]["function"]["name"] == function["name"]
    assert deltas[0]["type"] == "function" and {d["index"] for d in deltas} == {0}
    assert "".join(d["function"]["arguments"] or "" for d in deltas) == function["arguments"]
    assert finish_reasons(chunks) == ["tool_calls"]


def test_json_schema_response_format_content_validates(results):
    (choice,) = ok(results, "json_schema")["choices"]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), CITY_SCHEMA)
