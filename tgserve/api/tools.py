"""Tool calls for text-only models, the TGI way: when a request has tools and may (`auto`) or must
(`required`, a named function) call one, the output is constrained to one JSON object,
`{"name": <a tool's name>, "arguments": <its parameters>}`, which becomes the reply's
`tool_calls`. Under `auto` one more choice, `no_tool`, carries a plain answer in `content`.

The grammar is compact JSON with the properties in schema order, so the text always reads
`{"name":"<name>","arguments":<arguments>}`: a stream can send the arguments as they come.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from tgserve.api.schemas_openai import Tool

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = ("You can call the functions below. Reply with one JSON object "
                       '{"name": <function name>, "arguments": <its arguments>}.')


def tool_schema(tools: list[Tool], allow_answer: bool) -> dict:
    """The JSON schema of one call to any of `tools` (or a plain answer, with `allow_answer`)."""
    choices = [_call(t.function.name, t.function.parameters or {"type": "object"}) for t in tools]
    if allow_answer:
        choices.append(_call(NO_TOOL, {"type": "object", "properties": {"content": {"type": "string"}},
                                       "required": ["content"]}))
    return choices[0] if len(choices) == 1 else {"anyOf": choices}


def _call(name: str, parameters: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"]}


def tools_in_prompt(messages: list[dict], tools: list[Tool], prompt: str | None) -> list[dict]:
    """For a template that cannot show tools itself: the tools appended to the last message."""
    listing = json.dumps([t.model_dump(exclude_none=True) for t in tools], ensure_ascii=False)
    last = dict(messages[-1])
    last["content"] = f"{last.get('content') or ''}\n\n{prompt or DEFAULT_TOOL_PROMPT}\n{listing}"
    return [*messages[:-1], last]


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text

    @property
    def is_answer(self) -> bool:
        return self.name == NO_TOOL

    @property
    def answer(self) -> str:
        return json.loads(self.arguments).get("content", "")


def parse(text: str) -> ParsedCall | None:
    """The call in a constrained output (its arguments as generated, the text a stream sends);
    None when it was cut short (max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    head = '{"name":' + json.dumps(value["name"], ensure_ascii=False) + ',"arguments":'
    arguments = text[len(head):-1] if text.startswith(head) and text.endswith("}") else json.dumps(value["arguments"])
    return ParsedCall(value["name"], arguments)


@dataclass(slots=True)
class CallStreamer:
    """Turns the growing text of a constrained output into tool-call stream deltas: the name once
    known, then the arguments text as it comes (the closing brace of the object held back)."""

    call_id: str = field(default_factory=new_call_id)
    text: str = ""
    name: str | None = None
    start: int = 0  # where the arguments begin in `text`
    sent: int = 0  # characters of the arguments already sent

    def feed(self, piece: str, final: bool) -> list[dict]:
        self.text += piece
        deltas = []
        if self.name is None:
            head = '{"name":"'
            end = self.text.find('","arguments":', len(head))
            if end < 0:
                return []
            self.name = self.text[len(head):end]
            self.start = end + len('","arguments":')
            if self.name != NO_TOOL:
                deltas.append({"index": 0, "id": self.call_id, "type": "function",
                               "function": {"name": self.name, "arguments": ""}})
        if self.name == NO_TOOL:
            return deltas
        arguments = self.text[self.start:]
        ready = arguments[:-1] if final and arguments.endswith("}") else arguments[:max(len(arguments) - 1, 0)]
        if len(ready) > self.sent:
            deltas.append({"index": 0, "function": {"arguments": ready[self.sent:]}})
            self.sent = len(ready)
        return deltas
