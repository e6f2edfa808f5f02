"""Typed errors a request can end in, in both wire shapes: TGI's `{"error": ..., "error_type": ...}`
and OpenAI's `{"error": {"message", "type", "param", "code"}}` (with OpenAI's statuses)."""

from __future__ import annotations

import orjson


class InferError(Exception):
    status: int = 500
    error_type: str = "generation"
    prefix: str = ""
    # OpenAI's view of the same error
    openai_status: int = 500
    openai_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one (OpenAI's `param`)

    def body(self) -> dict:
        return {"error": self.prefix + self.message, "error_type": self.error_type}

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.openai_type, "param": self.param,
                          "code": self.code}}


class ValidationError(InferError):
    status, error_type, prefix = 422, "validation", "Input validation error: "
    openai_status, openai_type = 400, "invalid_request_error"


class OpenAIRequestError(ValidationError):
    """A request OpenAI's routes refuse with a status and code of their own (e.g. 422 for `suffix`,
    400 `context_length_exceeded`)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message, param)
        self.openai_status, self.code = status, code


class GenerationError(InferError):
    """The engine failed the request or died (TGI's 424 Failed Dependency)."""

    status, error_type, prefix = 424, "generation", "Request failed during generation: "


class OverloadedError(InferError):
    status, error_type = 429, "overloaded"
    openai_status, openai_type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class IncompleteGenerationError(InferError):
    status, error_type = 500, "incomplete_generation"

    def __init__(self) -> None:
        super().__init__("Incomplete generation")


class BodyError(InferError):
    """The body is not JSON (400) or not the right shape (422); TGI's axum rejections, in its JSON shape."""

    error_type = "validation"
    openai_status, openai_type = 400, "invalid_request_error"

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


UNHEALTHY = {"error": "unhealthy", "error_type": "healthcheck"}
