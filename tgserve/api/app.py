"""The API process: a FastAPI app over an engine client, served by uvicorn.

Malformed bodies get TGI's error JSON (400 for invalid JSON, 422 for a wrong shape) instead of
FastAPI's default shape. uvicorn's graceful shutdown lets in-flight requests finish on SIGTERM.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import orjson

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from tgserve import __version__
from tgserve.api.engine_client import EngineClient
from tgserve.api.errors import BodyError
from tgserve.api.metrics import Metrics
from tgserve.api.chat_template import ChatTemplate, ChatTemplateError
from tgserve.api.openai_requests import OpenAITranslator
from tgserve.api.routes_openai import router as openai_router
from tgserve.api.routes_tgi import router
from tgserve.api.serving import ApiContext
from tgserve.api.tokenizer import Tokenizer
from tgserve.api.validate import Validator
from tgserve.config import Config
from tgserve.process import become_child

log = logging.getLogger("tgserve.api")


def _body_error(exc: RequestValidationError) -> BodyError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
        return BodyError(f"Failed to parse the request body as JSON: {detail}", 400)
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errors)
    return BodyError(f"Failed to deserialize the JSON body into the target type: {detail}", 422)


def _openai_body_error(exc: RequestValidationError) -> BodyError:
    """OpenAI's words for a body it cannot read (always 400, invalid_request_error)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return BodyError("We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                         "using your HTTP library correctly.)", 400)
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    error = BodyError(f"Invalid '{where or 'body'}': {first.get('msg', 'invalid request')}.", 400)
    error.param = where
    return error


def _chat_template(config: Config) -> ChatTemplate | None:
    if config.model.path is None:
        return None
    try:
        return ChatTemplate.from_folder(config.model.path)
    except ChatTemplateError as e:  # chat is refused with this reason; the rest of the API serves
        log.warning("the model's chat template cannot be used: %s", e)
        return None


def _grammar_checker(config: Config, tokenizer: Tokenizer):
    """llguidance's validation over the model's tokenizer; None when grammars cannot be served."""
    if config.server.disable_grammar_support or config.model.path is None:
        return None
    from tgserve.grammars import GrammarChecker, load_tokenizer

    tok = load_tokenizer(config.model.path, None, sorted(tokenizer.eos_token_ids))
    return GrammarChecker(tok) if tok is not None else None


def create_app(config: Config, tokenizer: Tokenizer) -> FastAPI:
    metrics = Metrics()
    client = EngineClient(config.ipc_dir, config.server.max_concurrent_requests, tokenizer, metrics)
    validator = Validator(tokenizer, config.server, _grammar_checker(config, tokenizer))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        yield
        await client.close()
        validator.close()

    app = FastAPI(title="Text Generation Inference (tgserve)", version=__version__, lifespan=lifespan,
                  license_info={"name": "Apache 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"})
    translator = OpenAITranslator(validator, tokenizer, _chat_template(config), config.server.max_total_tokens,
                                  tokenizer.vocab_size, config.server.max_client_batch_size)
    app.state.ctx = ApiContext(config, validator, client, metrics, translator, int(time.time()))

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(request: Request, exc: RequestValidationError) -> Response:
        metrics.failure("validation", request.url.path)
        if request.url.path.startswith("/v1/"):  # OpenAI's door answers in OpenAI's shape
            error = _openai_body_error(exc)
            return Response(orjson.dumps(error.openai_body()), status_code=400, media_type="application/json")
        error = _body_error(exc)
        return Response(error.json(), status_code=error.status, media_type="application/json")

    app.include_router(router)
    app.include_router(openai_router)
    return app


def api_main(config: Config) -> None:
    """Entry point of the API process (started by the launcher)."""
    become_child(config.server.json_output)
    tokenizer = Tokenizer(config.model.path)
    app = create_app(config, tokenizer)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.server.hostname, port=config.server.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=config.server.graceful_termination_timeout,
    ))
    log.info("listening on http://%s:%d", config.server.hostname, config.server.port)
    server.run()
