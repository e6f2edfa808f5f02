"""OpenAI's routes: /v1/chat/completions, /v1/completions, /v1/models.

Requests are translated by openai_requests.py and run by serving.py like TGI's; this file only
writes OpenAI's objects: choices (stop strings cut from the text, as OpenAI does), logprobs in the
chat or the legacy shape, tool calls, usage, stream chunks ending in `data: [DONE]`, and errors as
`{"error": {"message", "type", "param", "code"}}` with OpenAI's statuses.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import AsyncIterator

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from tgserve import __version__
from tgserve.api import serving
from tgserve.api import tools as toolkit
from tgserve.api.errors import InferError
from tgserve.api.openai_requests import OpenAIPlan
from tgserve.api.outputs import FinalResult, RequestState, Token
from tgserve.api.schemas_openai import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                                        ErrorResponse, ModelList)
from tgserve.protocol import FinishReason

router = APIRouter()
JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
FINGERPRINT = f"{__version__}-native"
ERRORS = {status: {"model": ErrorResponse} for status in (400, 422, 429, 500)}


def _ctx(request: Request):
    return request.app.state.ctx


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)


def _error(ctx, error: InferError, route: str) -> Response:
    ctx.metrics.failure(error.error_type, route)
    return _json(error.openai_body(), error.openai_status)


def _sse(payload: dict | str) -> bytes:
    return b"data: " + (payload.encode() if isinstance(payload, str) else orjson.dumps(payload)) + b"\n\n"


class StopTrimmer:
    """Text up to (not including) the first stop string, released as soon as no stop can begin in
    it: a stream never sends what the final text does not hold."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1
        self.text, self.sent, self.done = "", 0, False

    def feed(self, piece: str, final: bool, whole: str | None = None) -> str:
        """`whole`: with the final piece, the finished text as decoded from all its ids; it replaces
        the pieces (whose last bytes may still be held back as an incomplete character)."""
        if self.done:
            return ""
        self.text = whole if whole is not None else self.text + piece
        start = max(0, self.sent - self.hold)
        cuts = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            end, self.done = min(cuts), True
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


def _cut(text: str, stops: tuple[str, ...]) -> str:
    return StopTrimmer(stops).feed(text, final=True)


def _finish_reason(final: FinalResult) -> str:
    return "length" if final.finish_reason is FinishReason.LENGTH else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chosen(state: RequestState) -> list[Token]:
    """Generated tokens as OpenAI reports them: without the closing EOS."""
    tokens = state.tokens
    return tokens[:-1] if tokens and tokens[-1].special else tokens


def _top_entry(t: Token) -> dict:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}


def _chat_logprob(token: Token, top: list[Token] | None, k: int) -> dict:
    return {**_top_entry(token), "top_logprobs": [_top_entry(t) for t in (top or [])[:k]]}


def _chat_logprobs(state: RequestState, k: int) -> dict:
    tokens = _chosen(state)
    tops = state.top_tokens or [None] * len(tokens)
    return {"content": [_chat_logprob(t, top, k) for t, top in zip(tokens, tops)]}


# ---- /v1/chat/completions -----------------------------------------------------------------------


def _chat_choice(index: int, state: RequestState, final: FinalResult, plan: OpenAIPlan) -> dict:
    message: dict = {"role": "assistant", "content": _cut(final.generated_text, plan.stops)}
    finish = _finish_reason(final)
    if plan.tools is not None:
        call = toolkit.parse(final.generated_text)
        if call is None:  # cut short by max_tokens: what there is, as text
            message["content"] = final.generated_text
        elif call.is_answer:
            message["content"] = call.answer
        else:
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": toolkit.new_call_id(), "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}]}
            finish = "tool_calls"
    logprobs = _chat_logprobs(state, plan.logprobs) if plan.logprobs is not None else None
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


async def _serve(request: Request, route: str, translate, chunks, respond) -> Response:
    """One OpenAI request end to end: translate it into plans, run them, answer in full or stream."""
    ctx = _ctx(request)
    ctx.metrics.received(route)
    start = time.monotonic()
    try:
        plans, stream, options = await translate(ctx)
        submitted = serving.submit(ctx.client, [plan.valid for plan in plans])
        if stream:
            include_usage = options is not None and options.include_usage
            # the background task aborts what still runs if the client leaves before the stream starts
            return StreamingResponse(chunks(ctx, plans, submitted, include_usage, start), media_type="text/event-stream",
                                     headers=SSE_HEADERS, background=BackgroundTask(submitted.abort))
        finals = await serving.collect(submitted, request)
    except InferError as e:
        return _error(ctx, e, route)
    except serving.ClientGone:
        return Response(status_code=499)
    completion_tokens = sum(f.generated_tokens for f in finals.values())
    ctx.metrics.success(time.monotonic() - start, completion_tokens)
    prompt_tokens = sum(len(plan.valid.prompt_ids) for plan in plans)
    return _json({**respond(ctx, plans, submitted, finals), "created": int(time.time()),
                  "model": ctx.config.model.model_id, "system_fingerprint": FINGERPRINT,
                  "usage": _usage(prompt_tokens, completion_tokens)})


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    async def translate(ctx):
        return [await ctx.openai.chat(body)], body.stream, body.stream_options

    def respond(ctx, plans, submitted, finals) -> dict:
        choices = [_chat_choice(i, s, finals[s.request_id], plans[0]) for i, s in enumerate(submitted.sequences)]
        return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "choices": choices}

    return await _serve(request, "/v1/chat/completions", translate, _chat_chunks, respond)


async def _chat_chunks(ctx, plans: list[OpenAIPlan], submitted: serving.Submitted, include_usage: bool,
                       start: float) -> AsyncIterator[bytes]:
    [plan] = plans
    head = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": ctx.config.model.model_id, "system_fingerprint": FINGERPRINT}
    index = {s.request_id: i for i, s in enumerate(submitted.sequences)}
    trimmers = {r: StopTrimmer(plan.stops) for r in index}
    calls = {r: toolkit.CallStreamer() for r in index} if plan.tools is not None else {}
    completion_tokens = 0

    def chunk(i: int, delta: dict, logprobs=None, finish: str | None = None) -> bytes:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    try:
        for r, i in index.items():
            yield chunk(i, {"role": "assistant", "content": ""})
        async with contextlib.aclosing(serving.stream(submitted)) as events:
            async for state, event in events:
                i, final, token = index[state.request_id], event.final, event.token
                piece = "" if token.special else token.text
                logprobs = None
                if plan.logprobs is not None and not (final is not None and token.special):
                    logprobs = {"content": [_chat_logprob(token, event.top_tokens, plan.logprobs)]}
                if calls:
                    deltas = calls[state.request_id].feed(piece, final is not None)
                    if deltas:
                        yield chunk(i, {"tool_calls": deltas}, logprobs)
                    elif logprobs is not None:
                        yield chunk(i, {}, logprobs)
                else:
                    text = trimmers[state.request_id].feed(piece, final is not None,
                                                           final.generated_text if final is not None else None)
                    if text or logprobs is not None:
                        yield chunk(i, {"content": text} if text else {}, logprobs)
                if final is not None:
                    completion_tokens += final.generated_tokens
                    finish = _finish_reason(final)
                    if calls:
                        streamer = calls[state.request_id]
                        if streamer.name == toolkit.NO_TOOL and (call := toolkit.parse(streamer.text)):
                            yield chunk(i, {"content": call.answer})
                        elif streamer.name is not None and toolkit.parse(streamer.text) is not None:
                            finish = "tool_calls"
                    yield chunk(i, {}, None, finish)
        ctx.metrics.success(time.monotonic() - start, completion_tokens)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(len(plan.valid.prompt_ids), completion_tokens)})
    except InferError as e:
        ctx.metrics.failure(e.error_type, "/v1/chat/completions")
        yield _sse(e.openai_body())
    yield _sse("[DONE]")


# ---- /v1/completions ----------------------------------------------------------------------------


def _legacy_logprobs(ctx, state: RequestState, plan: OpenAIPlan, text_offset: int) -> dict:
    """The legacy shape: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    tokens, token_logprobs, top_logprobs = [], [], []
    if plan.echo:
        ids = plan.valid.prompt_ids
        tokens += ctx.validator.tokenizer.decode_each(ids)
        token_logprobs += [None, *state.prefill_logprobs]
        top_logprobs += [None] + [{t: lp} for t, lp in zip(tokens[1:], state.prefill_logprobs)]
    chosen = _chosen(state)
    tops = state.top_tokens or [[] for _ in chosen]
    tokens += [t.text for t in chosen]
    token_logprobs += [t.logprob for t in chosen]
    top_logprobs += [{a.text: a.logprob for a in top[:plan.logprobs]} for top in tops[:len(chosen)]]
    offsets, at = [], text_offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _completion_choices(ctx, plans: list[OpenAIPlan], submitted: serving.Submitted,
                        finals: dict[str, FinalResult]) -> list[dict]:
    choices = []
    for p, (plan, root) in enumerate(zip(plans, submitted.roots)):
        group = [root, *root.siblings]
        if len(group) > plan.n:  # best_of: the n with the highest mean token logprob
            group = sorted(group, key=lambda s: -sum(t.logprob for t in s.tokens) / max(len(s.tokens), 1))[:plan.n]
        for j, state in enumerate(group):
            final = finals[state.request_id]
            text = _cut(final.generated_text, plan.stops)
            offset = 0 if plan.echo else len(plan.prompt_text)
            logprobs = _legacy_logprobs(ctx, state, plan, offset) if plan.logprobs is not None else None
            choices.append({"index": p * plan.n + j, "text": (plan.prompt_text if plan.echo else "") + text,
                            "logprobs": logprobs, "finish_reason": _finish_reason(final)})
    return choices


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    async def translate(ctx):
        return await ctx.openai.completions(body), body.stream, body.stream_options

    def respond(ctx, plans, submitted, finals) -> dict:
        return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion",
                "choices": _completion_choices(ctx, plans, submitted, finals)}

    return await _serve(request, "/v1/completions", translate, _completion_chunks, respond)


async def _completion_chunks(ctx, plans: list[OpenAIPlan], submitted: serving.Submitted, include_usage: bool,
                             start: float) -> AsyncIterator[bytes]:
    head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": ctx.config.model.model_id, "system_fingerprint": FINGERPRINT}
    where: dict[str, tuple[int, OpenAIPlan]] = {}
    for p, (plan, root) in enumerate(zip(plans, submitted.roots)):
        for j, state in enumerate((root, *root.siblings)):
            where[state.request_id] = (p * plan.n + j, plan)
    trimmers = {r: StopTrimmer(plan.stops) for r, (_, plan) in where.items()}
    completion_tokens = 0

    def chunk(i: int, text: str, logprobs=None, finish: str | None = None) -> bytes:
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    try:
        for r, (i, plan) in where.items():
            if plan.echo:
                yield chunk(i, plan.prompt_text)
        async with contextlib.aclosing(serving.stream(submitted)) as events:
            async for state, event in events:
                i, plan = where[state.request_id]
                token, final = event.token, event.final
                text = trimmers[state.request_id].feed("" if token.special else token.text, final is not None,
                                                       final.generated_text if final is not None else None)
                logprobs = None
                if plan.logprobs is not None and not token.special:
                    logprobs = {"tokens": [token.text], "token_logprobs": [token.logprob],
                                "top_logprobs": [{t.text: t.logprob for t in (event.top_tokens or [])[:plan.logprobs]}],
                                "text_offset": [0]}
                if text or logprobs is not None:
                    yield chunk(i, text, logprobs)
                if final is not None:
                    completion_tokens += final.generated_tokens
                    yield chunk(i, "", None, _finish_reason(final))
        ctx.metrics.success(time.monotonic() - start, completion_tokens)
        if include_usage:
            prompt_tokens = sum(len(p.valid.prompt_ids) for p in plans)
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    except InferError as e:
        ctx.metrics.failure(e.error_type, "/v1/completions")
        yield _sse(e.openai_body())
    yield _sse("[DONE]")


# ---- /v1/models ------------------------------------------------------------------------------------


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> Response:
    ctx = _ctx(request)
    return _json({"object": "list", "data": [{
        "id": ctx.config.model.model_id, "object": "model", "created": ctx.started, "owned_by": "tgserve",
        "max_model_len": ctx.config.server.max_total_tokens}]})
