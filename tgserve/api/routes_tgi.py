"""TGI's routes: /generate, /generate_stream, / (compat), /health, /info, /metrics.

Stream routes answer 200 and carry any error as one SSE event, as TGI does; /generate answers
errors with their status. A client that disconnects has its request aborted in the engine.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import AsyncIterator

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError as PydanticValidationError
from fastapi.responses import StreamingResponse

from tgserve import __version__
from tgserve.api import serving
from tgserve.api.serving import ApiContext
from tgserve.api.errors import UNHEALTHY, BodyError, InferError
from tgserve.api.outputs import FinalResult, RequestState, StreamEvent, Token
from tgserve.api.schemas_openai import ChatCompletionRequest, CompletionRequest
from tgserve.api.schemas_tgi import (ChatTokenizeResponse, CompatGenerateRequest, ErrorResponse, GenerateParameters,
                                    GenerateRequest, GenerateResponse, Info, StreamResponse, TokenizedToken)
from tgserve.api.validate import ValidRequest

router = APIRouter()
JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ERRORS = {status: {"model": ErrorResponse} for status in (400, 422, 424, 429)}
SSE_DOC = {200: {"description": "server-sent events, each `data:` + a StreamResponse (or one ErrorResponse)",
                 "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/StreamResponse"}}}}}


def _ctx(request: Request) -> ApiContext:
    return request.app.state.ctx


def _json(body: object, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _compute_type(ctx: ApiContext) -> str:
    return f"{ctx.config.model.device or 'cpu'}+optimized"  # TGI's header, named after our device


def _error(ctx: ApiContext, error: InferError) -> Response:
    ctx.metrics.failure(error.error_type)
    return Response(error.json(), status_code=error.status, media_type=JSON)


def _token_json(t: Token) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob if math.isfinite(t.logprob) else None,
            "special": t.special}


def _full_text(valid: ValidRequest, text: str) -> str:
    return valid.inputs + text if valid.return_full_text else text


def _prefill(ctx: ApiContext, valid: ValidRequest, logprobs: list[float]) -> list[dict]:
    """Every prompt token with its text and logprob (the first has none), when asked for."""
    if not valid.decoder_input_details:
        return []
    texts = ctx.validator.tokenizer.decode_each(valid.prompt_ids)
    return [{"id": i, "text": text, "logprob": lp} for i, text, lp in zip(valid.prompt_ids, texts, [None, *logprobs])]


def _sequence_details(state: RequestState, final: FinalResult, prefill: list[dict]) -> dict:
    details: dict = {"finish_reason": final.finish_reason.value, "generated_tokens": final.generated_tokens,
                     "seed": final.seed, "prefill": prefill, "tokens": [_token_json(t) for t in state.tokens]}
    if state.top_tokens:
        details["top_tokens"] = [[_token_json(t) for t in top] for top in state.top_tokens]
    return details


def _mean_logprob(state: RequestState) -> float:
    return sum(t.logprob for t in state.tokens) / max(len(state.tokens), 1)


# ---- /generate ------------------------------------------------------------------------------------


async def _generate(ctx: ApiContext, inputs: str, params: GenerateParameters | None, request: Request,
                    full_text_default: bool) -> tuple[dict, dict]:
    start = time.monotonic()
    ctx.metrics.received()
    valid = await ctx.validator.validate(inputs, params, stream=False, return_full_text_default=full_text_default)
    validated = time.monotonic()
    submitted = serving.submit(ctx.client, [valid])
    finals = await serving.collect(submitted, request)
    end = time.monotonic()
    group = submitted.sequences
    # best_of: TGI returns the sequence with the highest mean token logprob, the others beside it
    best = max(group, key=_mean_logprob)
    final = finals[best.request_id]
    ctx.metrics.success(end - start, final.generated_tokens)
    body: dict = {"generated_text": _full_text(valid, final.generated_text)}
    if valid.details:
        prefill = _prefill(ctx, valid, group[0].prefill_logprobs)
        body["details"] = _sequence_details(best, final, prefill)
        if len(group) > 1:
            body["details"]["best_of_sequences"] = [
                {"generated_text": _full_text(valid, finals[s.request_id].generated_text),
                 **_sequence_details(s, finals[s.request_id], prefill)}
                for s in group if s is not best]
    inference = end - validated
    headers = {
        "x-compute-type": _compute_type(ctx), "x-compute-characters": str(len(inputs)),
        "x-compute-time": f"{end - start:.6f}", "x-total-time": str(int((end - start) * 1000)),
        "x-validation-time": str(int((validated - start) * 1000)), "x-inference-time": str(int(inference * 1000)),
        "x-time-per-token": str(int(inference * 1000 / max(final.generated_tokens, 1))),
        "x-prompt-tokens": str(len(valid.prompt_ids)), "x-generated-tokens": str(final.generated_tokens),
    }
    return body, headers


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> Response:
    ctx = _ctx(request)
    try:
        result, headers = await _generate(ctx, body.inputs, body.parameters, request, full_text_default=False)
    except InferError as e:
        return _error(ctx, e)
    except serving.ClientGone:
        return Response(status_code=499)
    return _json(result, headers=headers)


# ---- /generate_stream -----------------------------------------------------------------------------


def _sse(payload: dict) -> bytes:
    return b"data:" + orjson.dumps(payload) + b"\n\n"


def _stream_event(event: StreamEvent, index: int, valid: ValidRequest) -> dict:
    payload: dict = {"index": index, "token": _token_json(event.token), "generated_text": None, "details": None}
    if event.top_tokens is not None:
        payload["top_tokens"] = [_token_json(t) for t in event.top_tokens]
    final = event.final
    if final is not None:
        payload["generated_text"] = _full_text(valid, final.generated_text)
        if valid.details:
            payload["details"] = {"finish_reason": final.finish_reason.value,
                                  "generated_tokens": final.generated_tokens, "seed": final.seed,
                                  "input_length": len(valid.prompt_ids)}
    return payload


async def _stream_events(ctx: ApiContext, inputs: str, params: GenerateParameters | None,
                         full_text_default: bool) -> AsyncIterator[bytes]:
    start = time.monotonic()
    ctx.metrics.received()
    try:
        valid = await ctx.validator.validate(inputs, params, stream=True, return_full_text_default=full_text_default)
        submitted = serving.submit(ctx.client, [valid])
        index = 0
        async with contextlib.aclosing(serving.stream(submitted)) as events:  # closing it aborts
            async for _, event in events:
                index += 1
                if event.final is not None:
                    ctx.metrics.success(time.monotonic() - start, event.final.generated_tokens)
                yield _sse(_stream_event(event, index, valid))
    except InferError as e:
        ctx.metrics.failure(e.error_type)
        yield _sse(e.body())


def _stream_response(ctx: ApiContext, inputs: str, params: GenerateParameters | None,
                     full_text_default: bool) -> StreamingResponse:
    headers = dict(SSE_HEADERS, **{"x-compute-characters": str(len(inputs)), "x-compute-type": _compute_type(ctx)})
    return StreamingResponse(_stream_events(ctx, inputs, params, full_text_default),
                             media_type="text/event-stream", headers=headers)


@router.post("/generate_stream", response_model=StreamResponse, responses=SSE_DOC)
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    return _stream_response(_ctx(request), body.inputs, body.parameters, full_text_default=False)


@router.post("/", response_model=list[GenerateResponse], responses={**ERRORS, **SSE_DOC})
async def compat_generate(body: CompatGenerateRequest, request: Request) -> Response:
    """TGI's compat route (what the Python clients call): a list, or SSE when `stream` is true.
    Its return_full_text defaults to true, as TGI's does for text-generation models."""
    ctx = _ctx(request)
    if body.stream:
        return _stream_response(ctx, body.inputs, body.parameters, full_text_default=True)
    try:
        result, headers = await _generate(ctx, body.inputs, body.parameters, request, full_text_default=True)
    except InferError as e:
        return _error(ctx, e)
    except serving.ClientGone:
        return Response(status_code=499)
    return _json([result], headers=headers)


# ---- health, info, metrics ------------------------------------------------------------------------


@router.get("/health")
@router.get("/", include_in_schema=False)
async def health(request: Request) -> Response:
    if _ctx(request).client.healthy:
        return Response(status_code=200)
    return _json(UNHEALTHY, status=503)


@router.get("/info", response_model=Info)
async def info(request: Request) -> Response:
    ctx = _ctx(request)
    cfg, ready = ctx.config, ctx.client.ready
    return _json({
        "model_id": cfg.model.model_id, "model_sha": None, "model_pipeline_tag": "text-generation",
        "model_dtype": ready.dtype if ready else cfg.model.dtype,
        "model_device_type": ready.device if ready else cfg.model.device,
        "max_concurrent_requests": cfg.server.max_concurrent_requests, "max_best_of": cfg.server.max_best_of,
        "max_stop_sequences": cfg.server.max_stop_sequences, "max_input_tokens": cfg.server.max_input_tokens,
        "max_total_tokens": cfg.server.max_total_tokens, "max_input_length": cfg.server.max_input_tokens,
        "waiting_served_ratio": cfg.scheduler.waiting_served_ratio,
        "max_batch_total_tokens": ready.max_batch_total_tokens if ready else None,
        "max_batch_prefill_tokens": cfg.scheduler.max_batch_prefill_tokens,
        "max_waiting_tokens": cfg.scheduler.max_waiting_tokens, "max_batch_size": cfg.scheduler.max_batch_size,
        "validation_workers": cfg.server.validation_workers,
        "max_client_batch_size": cfg.server.max_client_batch_size,
        "router": "tgserve", "version": __version__, "sha": None, "docker_label": None,
        "model_implementation": ready.implementation if ready else None,
    })


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_ctx(request).metrics.render(), media_type="text/plain; version=0.0.4")


# ---- /tokenize, /chat_tokenize, /invocations ------------------------------------------------------


def _tokens_json(tokenizer, text: str, add_special_tokens: bool, truncate: int | None = None) -> list[dict]:
    tokens = tokenizer.encode_with_offsets(text, add_special_tokens)
    if truncate is not None:
        tokens = tokens[-truncate:]
    raw = text.encode()
    return [{"id": i, "text": raw[a:b].decode(errors="replace"), "start": a, "stop": b} for i, a, b in tokens]


@router.post("/tokenize", response_model=list[TokenizedToken])
async def tokenize(body: GenerateRequest, request: Request) -> Response:
    """TGI's: each token of `inputs` with its text and byte offsets (`truncate` honoured)."""
    ctx = _ctx(request)
    truncate = body.parameters.truncate if body.parameters is not None else None
    return _json(_tokens_json(ctx.validator.tokenizer, body.inputs, True, truncate))


@router.post("/chat_tokenize", response_model=ChatTokenizeResponse)
async def chat_tokenize(body: ChatCompletionRequest, request: Request) -> Response:
    """TGI's: the chat request's rendered prompt, and its tokens."""
    ctx = _ctx(request)
    try:
        text, _, _ = ctx.openai.render(body)
    except InferError as e:
        return _error(ctx, e)
    return _json({"tokenize_response": _tokens_json(ctx.validator.tokenizer, text, False), "templated_text": text})


@router.post("/invocations")
async def invocations(request: Request) -> Response:
    """SageMaker's route, as TGI serves it: a chat, completion or generate body, told apart by its
    fields (`messages`, `prompt`, else `inputs`)."""
    from tgserve.api import routes_openai

    try:
        payload = await request.json()
    except ValueError as e:
        return _error(_ctx(request), BodyError(f"Failed to parse the request body as JSON: {e}", 400))
    kinds = ((ChatCompletionRequest, routes_openai.chat_completions) if "messages" in payload else
             (CompletionRequest, routes_openai.completions) if "prompt" in payload else
             (CompatGenerateRequest, compat_generate))
    model, route = kinds
    try:
        body = model.model_validate(payload)
    except PydanticValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    return await route(body, request)
