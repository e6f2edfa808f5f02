"""Chat templates: our renderer gives the very string transformers' apply_chat_template gives."""

from __future__ import annotations

import copy
import json
import os
from datetime import datetime

import pytest
from transformers import AutoTokenizer

from tests.conftest import build_tiny_tokenizer, read_json
from tgserve.api.chat_template import ChatTemplate, ChatTemplateError

CONVERSATIONS = {
    "system_and_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "no_system": [{"role": "user", "content": "Hello there, caf\u00e9 <b>&</b>"}],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\n\nA short one."},
        {"role": "assistant", "content": "Why did the GPU cross the road?"},
        {"role": "user", "content": "Why?"},
    ],
}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return ChatTemplate.from_folder(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_prompt_equals_transformers(smollm2, name, add_generation_prompt):
    ours, hf = smollm2
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected
    assert expected.endswith("<|im_start|>assistant\n") == add_generation_prompt  # the two cases differ


def test_text_parts_render_as_their_joined_string(smollm2):
    ours, hf = smollm2
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    before = copy.deepcopy(parts)
    expected = hf.apply_chat_template([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hello world"}],
                                      tokenize=False, add_generation_prompt=True)
    assert ours.render(parts) == expected
    assert parts == before  # the caller's messages are not edited


def test_continue_final_message_equals_transformers(smollm2):
    ours, hf = smollm2
    messages = CONVERSATIONS["system_and_user"] + [{"role": "assistant", "content": "The answer is "}]
    expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert expected.endswith("<|im_start|>assistant\nThe answer is ")  # open: no <|im_end|> after it
    assert ours.render(messages, add_generation_prompt=False, continue_final_message=True) == expected
    with pytest.raises(ChatTemplateError, match="cannot both"):
        ours.render(messages, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="drops the final message"):
        ChatTemplate({"default": "nothing"}).render(messages, add_generation_prompt=False,
                                                    continue_final_message=True)


# Block tags on their own indented lines: only trim_blocks + lstrip_blocks render them as transformers does.
# None content must be absent (not "None"); tojson must keep non-ASCII and HTML characters as they are.
TOOL_TEMPLATE = """{{ bos_token }}
{% if tools is not none %}
    <tools>
    {% for tool in tools %}
        {{ tool | tojson }}
        {% if loop.index == 2 %}{% break %}{% endif %}
    {% endfor %}
    </tools>
{% endif %}
{% for message in messages %}
    {% if message.role == 'tool' %}
        <response id={{ message.tool_call_id }}>{{ message.content }}</response>
        {% continue %}
    {% endif %}
    <{{ message.role }}>
    {% if message.content is defined %}
        {% generation %}{{ message.content }}{% endgeneration %}
    {% endif %}
    {% for call in message.tool_calls or [] %}
        <call id={{ call.id }}>{{ call.function | tojson(indent=2, sort_keys=True) }}</call>
    {% endfor %}
    {{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
    <assistant>
{% endif %}"""

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in \u00b0C <now> & later",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "never_rendered", "parameters": {}}},
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Z\u00fcrich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Z\u00fcrich\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 \u00b0C."},
    {"role": "user", "name": "bob", "content": "Thanks"},
]


TWO_TEMPLATES = {"default": "plain:{{ messages | length }}", "tool_use": TOOL_TEMPLATE}


@pytest.fixture(scope="module", params=["tokenizer_config_list", "saved_jinja_files"])
def tool_folder(request, tmp_path_factory) -> str:
    """The tiny tokenizer with two named templates: as a list in tokenizer_config.json, or as
    transformers saves them (chat_template.jinja + additional_chat_templates/tool_use.jinja)."""
    folder = str(tmp_path_factory.mktemp("tool-template"))
    build_tiny_tokenizer(folder)
    if request.param == "saved_jinja_files":
        hf = AutoTokenizer.from_pretrained(folder)
        hf.chat_template = TWO_TEMPLATES
        hf.save_pretrained(folder)
        assert os.path.isfile(os.path.join(folder, "additional_chat_templates", "tool_use.jinja"))
        return folder
    os.remove(os.path.join(folder, "chat_template.jinja"))
    config = read_json(os.path.join(folder, "tokenizer_config.json"))
    config["chat_template"] = [{"name": name, "template": t} for name, t in TWO_TEMPLATES.items()]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return folder


def test_tool_prompt_equals_transformers(tool_folder):
    hf = AutoTokenizer.from_pretrained(tool_folder)
    assert hf.chat_template == TWO_TEMPLATES  # transformers read the same two templates
    ours = ChatTemplate.from_folder(tool_folder)
    expected = hf.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "Weather in \u00b0C <now> & later" in expected and "None" not in expected
    assert ours.render(TOOL_CONVERSATION, tools=TOOLS) == expected
    # without tools the "default" template is chosen, by both
    plain = hf.apply_chat_template(TOOL_CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours.render(TOOL_CONVERSATION) == plain == "plain:5"


def test_reasoning_is_seen_under_every_name_as_in_transformers(tool_folder):
    hf = AutoTokenizer.from_pretrained(tool_folder)
    template = "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.content }}]{% endfor %}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": "hmm", "content": "a"}]
    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert expected == "[||q][hmm|hmm|a]"
    assert ChatTemplate({"default": template}).render(messages, add_generation_prompt=False) == expected


def test_special_tokens_are_read_from_objects_too(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<B>", "lstrip": False}, "eos_token": "<E>",
        "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}))
    assert ChatTemplate.from_folder(str(tmp_path)).render([{"role": "user", "content": "x"}]) == "<B>x<E>"


def test_template_files_take_precedence_in_transformers_order(tmp_path):
    def found() -> str:
        return ChatTemplate.from_folder(str(tmp_path)).render([])

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}))
    assert found() == "config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert found() == "json"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert found() == "jinja"


def test_strftime_now_and_extra_variables_reach_the_template(tmp_path):
    template = ChatTemplate({"default": "{{ strftime_now('%Y') }}{% if enable_thinking %} think{% endif %}"})
    year = str(datetime.now().year)
    assert template.render([]) == year
    assert template.render([], enable_thinking=True) == year + " think"


def test_image_part_is_refused(smollm2):
    ours, _ = smollm2
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ChatTemplateError, match="'image_url' is not supported"):
        ours.render(image)


def test_raise_exception_becomes_chat_template_error_with_its_message():
    template = ChatTemplate({"default": "{% if messages[0].role != 'user' %}"
                                        "{{ raise_exception('Conversations must start with a user turn') }}"
                                        "{% endif %}ok"})
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError) as info:
        template.render([{"role": "assistant", "content": "x"}])
    assert str(info.value) == "Conversations must start with a user turn"


def test_template_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate({"default": "{% for m in messages %}"})
    broken = ChatTemplate({"default": "{{ messages[0].content + 1 }}"})
    with pytest.raises(ChatTemplateError, match="TypeError"):
        broken.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        ChatTemplate({"tool_use": "x"}).render([])


def test_a_folder_without_template_has_none(tmp_path):
    assert ChatTemplate.from_folder(str(tmp_path)) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert ChatTemplate.from_folder(str(tmp_path)) is None
