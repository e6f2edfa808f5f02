"""huggingface_hub's InferenceClient (from its own virtualenv) against the real SmolLM2, as a user
points it at a TGI endpoint (`base_url=`): text_generation goes to `POST /`, chat_completion to
/v1/chat/completions. Greedy text is checked against transformers' generate on the same weights,
streams against the same request unstreamed, tool calls and structured output against their
JSON schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.e2e.clients import client_python, ok, reference, run_client

pytestmark = pytest.mark.slow

HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]  # runs to max_tokens
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]  # stops at EOS
WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
MAX_TOKENS = 20
LOGPROB_TOLERANCE = 2e-3
EOS_TEXT = "<|im_end|>"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                           "parameters": WEATHER_PARAMETERS}}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "country": {"type": "string", "maxLength": 20}},
               "required": ["city", "country"]}

CLIENT_SCRIPT = r'''
from huggingface_hub import InferenceClient

client = InferenceClient(base_url=sys.argv[1], timeout=300)
PROMPTS, HAIKU, FRANCE, WEATHER, TOOLS, CITY_SCHEMA, MAX_TOKENS = json.loads(sys.argv[2])
generate, chat = client.text_generation, client.chat_completion

def once(make, *args, **kw):
    return lambda: json.loads(json.dumps(make(*args, **kw)))  # the outputs are dicts

def stream(make, *args, **kw):
    return lambda: [json.loads(json.dumps(item)) for item in make(*args, stream=True, **kw)]

jobs = {}
for name, prompt in PROMPTS.items():
    jobs["generate_" + name] = once(generate, prompt, max_new_tokens=MAX_TOKENS, details=True, return_full_text=False)
    jobs["generate_stream_" + name] = stream(generate, prompt, max_new_tokens=MAX_TOKENS, details=True,
                                             return_full_text=False)
    jobs["generate_plain_" + name] = once(generate, prompt, max_new_tokens=MAX_TOKENS)
    jobs["generate_plain_stream_" + name] = stream(generate, prompt, max_new_tokens=MAX_TOKENS)
for name, messages in (("haiku", HAIKU), ("france", FRANCE)):
    jobs["chat_" + name] = once(chat, messages, max_tokens=MAX_TOKENS, temperature=0)
    jobs["chat_stream_" + name] = stream(chat, messages, max_tokens=MAX_TOKENS, temperature=0)
jobs["chat_logprobs"] = once(chat, HAIKU, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2)
seeded = dict(max_tokens=10, temperature=0.8, seed=7)
jobs["chat_seeded"] = once(chat, HAIKU, **seeded)
jobs["chat_seeded_again"] = once(chat, HAIKU, **seeded)
jobs["chat_seeded_stream"] = stream(chat, HAIKU, **seeded)
tools = dict(max_tokens=60, temperature=0, tools=TOOLS, tool_choice="required")
jobs["tools"] = once(chat, WEATHER, **tools)
jobs["tools_stream"] = stream(chat, WEATHER, **tools)
fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY_SCHEMA}}
jobs["json_schema"] = once(chat, FRANCE, max_tokens=40, temperature=0, response_format=fmt)
run(jobs)
'''

CHATS = {"haiku": HAIKU, "france": FRANCE}


@pytest.fixture(scope="module")
def ref(smollm2_dir):
    return reference(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(ref) -> dict[str, str]:
    """The chat template rendered by transformers: the raw prompts text_generation sends."""
    return {name: ref.chat_prompt(messages) for name, messages in CHATS.items()}


@pytest.fixture(scope="module")
def results(smollm2_server, prompts):
    python = client_python("TGSERVE_HF_PYTHON", ".venv-hf/bin/python")
    inputs = [prompts, HAIKU, FRANCE, WEATHER, TOOLS, CITY_SCHEMA, MAX_TOKENS]
    return run_client(python, CLIENT_SCRIPT, smollm2_server.url, args=[json.dumps(inputs)])


def tgi_finish_reason(greedy) -> str:
    return "eos_token" if greedy.eos else "length"


# ---- text_generation (POST /) ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHATS)
def test_text_generation_details_equal_transformers_generate(results, ref, prompts, name):
    # TGI tokenizes generate inputs with the special tokens a tokenizer adds
    expected = ref.greedy(prompts[name], MAX_TOKENS, add_special_tokens=True)
    output = ok(results, "generate_" + name)
    details = output["details"]
    assert output["generated_text"] == expected.text
    assert [t["id"] for t in details["tokens"]] == expected.ids
    assert [t["special"] for t in details["tokens"]] == [t in ref.eos_ids for t in expected.ids]
    assert details["finish_reason"] == tgi_finish_reason(expected)
    assert details["generated_tokens"] == len(expected.ids)
    rows = ref.log_softmax(expected.prompt_ids, expected.ids)
    assert [t["logprob"] for t in details["tokens"]] == pytest.approx(
        [float(rows[i, t]) for i, t in enumerate(expected.ids)], abs=LOGPROB_TOLERANCE)


@pytest.mark.parametrize("name", CHATS)
def test_text_generation_stream_concatenates_to_the_unstreamed_text(results, name):
    output, events = ok(results, "generate_" + name), ok(results, "generate_stream_" + name)
    tokens = [e["token"] for e in events]
    assert [t["id"] for t in tokens] == [t["id"] for t in output["details"]["tokens"]]
    assert "".join(t["text"] for t in tokens if not t["special"]) == output["generated_text"]
    assert events[-1]["generated_text"] == output["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["details"]["finish_reason"] == output["details"]["finish_reason"]
    assert events[-1]["details"]["generated_tokens"] == output["details"]["generated_tokens"]


@pytest.mark.parametrize("name", CHATS)
def test_text_generation_plain_text_and_token_stream(results, ref, prompts, name):
    """Without details the client returns the text and streams token texts. On `POST /` TGI returns
    the full text by default (`return_full_text` is true for text-generation models); the stream's
    token texts include the closing EOS token's text, as TGI sends it."""
    expected = ref.greedy(prompts[name], MAX_TOKENS, add_special_tokens=True)
    assert ok(results, "generate_plain_" + name) == prompts[name] + expected.text
    pieces = ok(results, "generate_plain_stream_" + name)
    assert len(pieces) == len(expected.ids)
    assert "".join(pieces) == expected.text + (EOS_TEXT if expected.eos else "")


# ---- chat_completion (/v1/chat/completions) ----------------------------------------------------------------


@pytest.mark.parametrize("name", CHATS)
def test_chat_completion_equals_transformers_generate(results, ref, name):
    expected = ref.greedy_chat(CHATS[name], MAX_TOKENS)
    output = ok(results, "chat_" + name)
    (choice,) = output["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected.text
    assert choice["finish_reason"] == expected.finish_reason
    assert output["usage"]["prompt_tokens"] == len(expected.prompt_ids)
    assert output["usage"]["total_tokens"] == output["usage"]["prompt_tokens"] + output["usage"]["completion_tokens"]


@pytest.mark.parametrize("name", CHATS)
def test_chat_completion_stream_concatenates_to_the_unstreamed_reply(results, name):
    (choice,) = ok(results, "chat_" + name)["choices"]
    chunks = ok(results, "chat_stream_" + name)
    deltas = [ch for c in chunks for ch in c["choices"]]
    assert deltas[0]["delta"]["role"] == "assistant"
    assert "".join(d["delta"]["content"] or "" for d in deltas) == choice["message"]["content"]
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == [choice["finish_reason"]]
    assert deltas[-1]["finish_reason"] == choice["finish_reason"]


def test_chat_completion_logprobs_are_transformers_log_softmax(results, ref):
    expected = ref.greedy_chat(HAIKU, MAX_TOKENS)
    (choice,) = ok(results, "chat_logprobs")["choices"]
    assert choice["message"]["content"] == expected.text
    content = choice["logprobs"]["content"]
    rows = ref.log_softmax(expected.prompt_ids, expected.ids)
    assert "".join(e["token"] for e in content) == expected.text
    assert [e["logprob"] for e in content] == pytest.approx(
        [float(rows[i, t]) for i, t in enumerate(expected.ids) if t not in ref.eos_ids], abs=LOGPROB_TOLERANCE)
    for i, entry in enumerate(content):
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert top == pytest.approx(rows[i].topk(2).values.tolist(), abs=LOGPROB_TOLERANCE)


def test_seeded_chat_completion_is_reproducible_streamed_or_not(results):
    text = ok(results, "chat_seeded")["choices"][0]["message"]["content"]
    assert text and ok(results, "chat_seeded_again")["choices"][0]["message"]["content"] == text
    chunks = ok(results, "chat_seeded_stream")
    assert "".join(ch["delta"]["content"] or "" for c in chunks for ch in c["choices"]) == text


def arguments_of(function: dict) -> dict:
    """huggingface_hub types `arguments` as Any: TGI once sent an object, OpenAI sends a JSON string."""
    arguments = function["arguments"]
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def test_chat_completion_required_tool_call_validates_against_the_schema(results):
    (choice,) = ok(results, "tools")["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"]
    jsonschema.validate(arguments_of(call["function"]), WEATHER_PARAMETERS)


def test_chat_completion_streamed_tool_call_concatenates_to_the_unstreamed_arguments(results):
    (call,) = ok(results, "tools")["choices"][0]["message"]["tool_calls"]
    deltas = [ch for c in ok(results, "tools_stream") for ch in c["choices"]]
    calls = [t for d in deltas for t in d["delta"]["tool_calls"] or []]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    streamed = "".join(t["function"]["arguments"] or "" for t in calls)
    if isinstance(call["function"]["arguments"], str):
        assert streamed == call["function"]["arguments"]
    assert json.loads(streamed) == arguments_of(call["function"])
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["tool_calls"]


def test_chat_completion_json_schema_response_format_validates(results):
    """huggingface_hub rewrites OpenAI's json_schema format to TGI's {"type": "json_object", "value": schema}."""
    (choice,) = ok(results, "json_schema")["choices"]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), CITY_SCHEMA)
