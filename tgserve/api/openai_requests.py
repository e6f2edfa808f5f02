"""OpenAI's requests → the engine's ValidRequests, with OpenAI's limits, statuses and messages.

One translation per front door keeps every parameter implemented once: sampling, stops, logprobs
and grammars are the engine's; here OpenAI's fields are checked and mapped onto them (temperature 0
is greedy; presence / frequency penalties are OpenAI's own, over generated tokens; `n` and
`best_of` become sibling sequences sharing the prompt's KV blocks; `response_format` and tools
become grammars).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass

from tgserve.api.chat_template import ChatTemplate, ChatTemplateError
from tgserve.api.errors import OpenAIRequestError
from tgserve.api.schemas_openai import ChatCompletionRequest, CompletionRequest, ResponseFormat
from tgserve.api.tokenizer import Tokenizer
from tgserve.api import tools as toolkit
from tgserve.api.validate import ValidRequest, Validator
from tgserve.params import GrammarSpec, SamplingParams, StoppingParams

MAX_N = 128
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_BEST_OF = 20
_SEED_STEP = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class OpenAIPlan:
    """What one prompt of an OpenAI request became, and how to present its results."""

    valid: ValidRequest
    prompt_text: str
    n: int  # choices returned (best_of > n generates more and keeps the best)
    stops: tuple[str, ...]  # cut from the returned text, as OpenAI does
    logprobs: int | None  # top alternatives per token (0: the chosen ones only); None: no logprobs
    tools: str | None = None  # "required" or "auto" when the output is a constrained tool call
    echo: bool = False


def _check_range(value, low, high, name: str) -> None:
    if value is not None and not low <= value <= high:
        raise OpenAIRequestError(f"Invalid '{name}': expected a value between {low} and {high}, got {value}.",
                                 param=name)


class OpenAITranslator:
    def __init__(self, validator: Validator, tokenizer: Tokenizer, template: ChatTemplate | None,
                 max_total_tokens: int, vocab_size: int, max_client_batch_size: int = 4):
        self.validator, self.tokenizer, self.template = validator, tokenizer, template
        self.max_total_tokens, self.vocab_size = max_total_tokens, vocab_size
        self.max_client_batch_size = max_client_batch_size

    # ---- chat ---------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest) -> OpenAIPlan:
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIRequestError("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        _check_range(body.top_logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")
        text, tool_mode, grammar = self.render(body)
        if grammar is not None:
            await asyncio.get_running_loop().run_in_executor(
                self.validator.pool, self._check_grammar, grammar, "tools" if tool_mode else "response_format")
        ids = await self._encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        valid = await self._valid(text, ids, body, max_tokens, name, body.n or 1, grammar,
                                  top_n=body.top_logprobs or 0, prompt_logprobs=False)
        return OpenAIPlan(valid, text, body.n or 1, self._stops(body.stop),
                          (body.top_logprobs or 0) if body.logprobs else None, tool_mode)

    def render(self, body: ChatCompletionRequest) -> tuple[str, str | None, GrammarSpec | None]:
        """The prompt text, the tool mode ("auto" / "required" / None) and the output's grammar."""
        if not body.messages:
            raise OpenAIRequestError("'messages' must contain at least one message.", param="messages")
        if self.template is None:
            raise OpenAIRequestError("This model has no chat template: use /v1/completions.", param="messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tools, tool_mode = self._tool_mode(body)
        grammar = None
        if tool_mode is not None:
            if body.response_format is not None and body.response_format.type != "text":
                raise OpenAIRequestError("'response_format' cannot be used together with tool calls.",
                                         param="response_format")
            grammar = GrammarSpec("json_schema", json.dumps(toolkit.tool_schema(tools, tool_mode == "auto")))
        elif body.response_format is not None:
            grammar = self._response_grammar(body.response_format)
        tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        try:
            if tools and not self.template.reads("tools"):
                messages = toolkit.tools_in_prompt(messages, tools, body.tool_prompt)
                tool_dicts = None
            text = self.template.render(messages, add_generation_prompt=True, tools=tool_dicts)
        except ChatTemplateError as e:
            raise OpenAIRequestError(f"Template error: {e.message}", param="messages") from None
        return text, tool_mode, grammar

    def _tool_mode(self, body: ChatCompletionRequest):
        choice = body.tool_choice
        tools = body.tools or []
        if choice is not None and not tools and choice != "none":
            raise OpenAIRequestError("'tool_choice' is set but no 'tools' are given.", param="tool_choice")
        if not tools or choice == "none":
            return tools, None
        if choice is None or choice == "auto":
            return tools, "auto"
        if choice == "required":
            return tools, "required"
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise OpenAIRequestError(f"tool_choice names '{choice.function.name}', which is not among the tools.",
                                     param="tool_choice")
        return named, "required"

    def _response_grammar(self, fmt: ResponseFormat) -> GrammarSpec | None:
        if fmt.type == "text":
            return None
        if fmt.type == "regex":
            if not isinstance(fmt.value, str):
                raise OpenAIRequestError("A 'regex' response_format needs a pattern in 'value'.", param="response_format")
            return GrammarSpec("regex", fmt.value)
        if fmt.type == "json_schema" and fmt.json_schema is not None:
            schema = fmt.json_schema.schema_
        elif fmt.value is not None:  # TGI's {"type": "json_object" | "json", "value": schema}
            schema = json.loads(fmt.value) if isinstance(fmt.value, str) else fmt.value
        elif fmt.type == "json_schema":
            raise OpenAIRequestError("A 'json_schema' response_format needs 'json_schema.schema'.",
                                     param="response_format")
        else:
            schema = None
        return GrammarSpec("json_schema", json.dumps(schema if schema is not None else {"type": "object"}))

    def _check_grammar(self, spec: GrammarSpec, param: str) -> None:
        """llguidance must accept it (run on a validation thread)."""
        check = self.validator.grammar_check
        if check is None:
            raise OpenAIRequestError("Structured output is not supported by this server.", param=param)
        error = check(spec)
        if error is not None:
            raise OpenAIRequestError(f"Invalid '{param}': {error}", param=param)

    # ---- completions ----------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest) -> list[OpenAIPlan]:
        if body.suffix is not None:
            raise OpenAIRequestError("Suffix is not supported and can be achieved by preprocessing the prompt.",
                                     param="suffix", status=422, code="suffix_not_supported")
        _check_range(body.logprobs, 0, MAX_COMPLETION_LOGPROBS, "logprobs")
        n = body.n or 1
        best_of = body.best_of if body.best_of is not None else n
        _check_range(best_of, 1, MAX_BEST_OF, "best_of")
        if best_of < n:
            raise OpenAIRequestError("'best_of' must be greater than or equal to 'n'.", param="best_of")
        if body.stream and best_of > n:
            raise OpenAIRequestError("'best_of' cannot be used when streaming.", param="best_of")
        prompts = self._prompts(body.prompt)
        if len(prompts) > self.max_client_batch_size:  # TGI's --max-client-batch-size
            raise OpenAIRequestError(f"Number of prompts ({len(prompts)}) exceeds the server's limit of "
                                     f"{self.max_client_batch_size} (--max-client-batch-size).", param="prompt",
                                     status=422, code="batch_size_exceeded")
        plans = []
        for prompt in prompts:
            if isinstance(prompt, str):
                text, ids = prompt, await self._encode(prompt, add_special_tokens=True)
            else:
                text, ids = self.tokenizer.decode(prompt), prompt
            max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI: null means 16
            valid = await self._valid(text, ids, body, max_tokens, "max_tokens", best_of, None,
                                      top_n=body.logprobs or 0, prompt_logprobs=body.echo and body.logprobs is not None)
            plans.append(OpenAIPlan(valid, text, n, self._stops(body.stop), body.logprobs, echo=body.echo))
        return plans

    def _prompts(self, prompt) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise OpenAIRequestError("'prompt' must not be empty.", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        out = list(prompt)
        for p in out:
            if isinstance(p, list) and (not p or any(not 0 <= t < self.vocab_size for t in p)):
                raise OpenAIRequestError(f"Token ids in 'prompt' must be between 0 and {self.vocab_size - 1}.",
                                         param="prompt")
        return out

    # ---- shared --------------------------------------------------------------------------------------

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.validator.pool, self.tokenizer.encode, text, add_special_tokens)

    def _stops(self, stop) -> tuple[str, ...]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOP:
            raise OpenAIRequestError(f"'stop' takes at most {MAX_STOP} sequences.", param="stop")
        if any(not s for s in stops):
            raise OpenAIRequestError("'stop' sequences must not be empty.", param="stop")
        return stops

    async def _valid(self, text: str, ids: list[int], body, max_tokens: int | None, max_tokens_name: str,
                     sequences: int, grammar: GrammarSpec | None, top_n: int, prompt_logprobs: bool) -> ValidRequest:
        _check_range(body.temperature, 0.0, 2.0, "temperature")
        _check_range(body.top_p, 0.0, 1.0, "top_p")
        _check_range(body.frequency_penalty, -2.0, 2.0, "frequency_penalty")
        _check_range(body.presence_penalty, -2.0, 2.0, "presence_penalty")
        _check_range(body.n, 1, MAX_N, "n")
        if body.top_p == 0.0:
            raise OpenAIRequestError("Invalid 'top_p': it must be greater than 0.", param="top_p")
        if max_tokens is not None and max_tokens < 1:
            raise OpenAIRequestError(f"Invalid '{max_tokens_name}': it must be at least 1.", param=max_tokens_name)
        if not ids:
            raise OpenAIRequestError("The prompt is empty.", param="prompt" if isinstance(body, CompletionRequest)
                                     else "messages")
        room = self.max_total_tokens - len(ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise OpenAIRequestError(
                f"This model's maximum context length is {self.max_total_tokens} tokens. However, you requested "
                f"{len(ids) + asked} tokens ({len(ids)} in the prompt, {asked} in the completion). "
                "Please reduce the length of the prompt or completion.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded")
        bias = self._logit_bias(body.logit_bias)
        greedy = body.temperature == 0.0
        seed = (body.seed if body.seed is not None else secrets.randbits(64)) % 2**64
        sampling = SamplingParams(
            do_sample=not greedy, temperature=1.0 if greedy or body.temperature is None else body.temperature,
            top_p=1.0 if greedy or body.top_p is None else body.top_p,
            output_frequency_penalty=body.frequency_penalty or 0.0,
            output_presence_penalty=body.presence_penalty or 0.0, logit_bias=bias, grammar=grammar,
            seed=seed, top_n_tokens=top_n, prompt_logprobs=prompt_logprobs)
        stopping = StoppingParams(max_new_tokens=max_tokens if max_tokens is not None else room,
                                  stop_token_ids=self.tokenizer.eos_token_ids,
                                  stop_sequences=self._stops(body.stop))
        siblings = tuple((seed + k * _SEED_STEP) % 2**64 for k in range(1, sequences))
        return ValidRequest(text, ids, sampling, stopping, details=True, return_full_text=False,
                            seed=None if greedy else seed, sibling_seeds=siblings)

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        out = []
        for key, value in (bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise OpenAIRequestError(f"Invalid 'logit_bias': key {key!r} is not a token id.", param="logit_bias") \
                    from None
            if not 0 <= token < self.vocab_size:
                raise OpenAIRequestError(f"Invalid 'logit_bias': token id {token} is outside the vocabulary.",
                                         param="logit_bias")
            _check_range(value, -100.0, 100.0, "logit_bias")
            out.append((token, float(value)))
        return tuple(out)

