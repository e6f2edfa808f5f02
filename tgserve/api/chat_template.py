"""OpenAI chat `messages` → one prompt string, with the model's own Jinja chat template.

Our own renderer, not `apply_chat_template`: the API needs only text, without a tokenizer per call. The
environment and variables are the ones transformers renders with, so the prompt is the model's string."""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# the names transformers hands every template (`special_tokens_map`), when the model sets them
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# appended to the final message to find where it ends once rendered (transformers' marker)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(jinja2.TemplateError):
    """A conversation the template cannot render; its message is the template's own words."""


def raise_exception(message: str):
    raise ChatTemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own filter escapes HTML characters (<, >, &, '), which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationTag(Extension):
    """Training templates wrap assistant turns in {% generation %}; for a prompt it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class ChatTemplate:
    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str] | None = None):
        """`templates` by name ("default", "tool_use", …); a model with one template names it "default"."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self.templates = {name: env.from_string(source) for name, source in templates.items()}
            self._variables = {name: meta.find_undeclared_variables(env.parse(source))
                               for name, source in templates.items()}
        except jinja2.TemplateError as e:  # a model whose template does not parse cannot chat at all
            raise ChatTemplateError(f"the chat template does not compile: {e}") from e
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_folder(cls, folder: str) -> "ChatTemplate | None":
        """Where transformers finds a saved tokenizer's template: chat_template.jinja (plus named ones in
        additional_chat_templates/), else chat_template.json, else tokenizer_config.json. None: no template."""
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        templates = _jinja_files(folder)
        if not templates:
            found = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
            found = found if found is not None else config.get("chat_template")
            named = {t["name"]: t["template"] for t in found} if isinstance(found, list) else {}
            templates = {"default": found} if isinstance(found, str) else named
        if not templates:
            return None
        tokens = {name: config[name]["content"] if isinstance(config[name], dict) else str(config[name])
                  for name in SPECIAL_TOKENS if config.get(name) is not None}  # a string, or an AddedToken's dict
        return cls(templates, tokens)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, continue_final_message: bool = False, **extra) -> str:
        """The prompt text; `extra` reaches the template as variables (e.g. enable_thinking)."""
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
        chat = [_plain_message(m) for m in messages]
        final = chat[-1].get("content") if chat else None
        if continue_final_message:
            if not isinstance(final, str):
                raise ChatTemplateError("continue_final_message needs a final message with text content")
            chat[-1]["content"] = final + _CONTINUE_TAG
        try:
            text = self._pick(tools).render(messages=chat, tools=tools, documents=documents,
                                            add_generation_prompt=add_generation_prompt,
                                            **{**self.special_tokens, **extra})
        except jinja2.TemplateError as e:
            raise ChatTemplateError(e.message or type(e).__name__) from e
        except Exception as e:  # the template's code failed on this conversation (a bad request)
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
        if continue_final_message:
            cut = text.rfind(_CONTINUE_TAG.strip())
            if cut < 0 or final.strip() not in text:
                raise ChatTemplateError("the chat template drops the final message, so it cannot be continued")
            # a template that strips the content also strips the spacing before our marker
            text = text[:cut] if text.startswith(_CONTINUE_TAG, cut) else text[:cut].rstrip()
        return text

    def reads(self, variable: str) -> bool:
        """Whether the template that would render with tools uses `variable` (can it show tools?)."""
        name = "tool_use" if "tool_use" in self.templates else "default"
        return variable in self._variables.get(name, set())

    def _pick(self, tools) -> jinja2.Template:
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ChatTemplateError(f"the model has chat templates {sorted(self.templates)} but none named 'default'")


def _plain_message(message: dict) -> dict:
    """A copy the template may read: None values dropped (as transformers does: templates test for a
    missing key, not for None), text parts joined, reasoning under every name templates read it by."""
    out = {key: value for key, value in message.items() if value is not None}
    if isinstance(out.get("content"), list):
        out["content"] = _joined_text(out["content"])
    reasoning = next((out[key] for key in _REASONING_KEYS if key in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _joined_text(parts: list) -> str:
    """Text-only models see one string; parts join with nothing between them, as TGI joins them."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"content part of type {kind!r} is not supported: this model reads text only")
        texts.append(part["text"])
    return "".join(texts)


def _jinja_files(folder: str) -> dict[str, str]:
    extra_dir = os.path.join(folder, "additional_chat_templates")
    names = os.listdir(extra_dir) if os.path.isdir(extra_dir) else []
    paths = {"default": os.path.join(folder, "chat_template.jinja"),
             **{n.removesuffix(".jinja"): os.path.join(extra_dir, n) for n in names if n.endswith(".jinja")}}
    return {name: _read(path) for name, path in paths.items() if os.path.isfile(path)}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_json(path: str) -> dict:
    return json.loads(_read(path)) if os.path.isfile(path) else {}
