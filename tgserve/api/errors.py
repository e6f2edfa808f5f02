"""Typed errors a request can end in, and their TGI wire shape: `{"error": ..., "error_type": ...}`."""

from __future__ import annotations

import orjson


class InferError(Exception):
    status: int = 500
    error_type: str = "generation"
    prefix: str = ""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def body(self) -> dict:
        return {"error": self.prefix + self.message, "error_type": self.error_type}

    def json(self) -> bytes:
        return orjson.dumps(self.body())


class ValidationError(InferError):
    status, error_type, prefix = 422, "validation", "Input validation error: "


class GenerationError(InferError):
    """The engine failed the request or died (TGI's 424 Failed Dependency)."""

    status, error_type, prefix = 424, "generation", "Request failed during generation: "


class OverloadedError(InferError):
    status, error_type = 429, "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class IncompleteGenerationError(InferError):
    status, error_type = 500, "incomplete_generation"

    def __init__(self) -> None:
        super().__init__("Incomplete generation")


class BodyError(InferError):
    """The body is not JSON (400) or not the right shape (422); TGI's axum rejections, in its JSON shape."""

    error_type = "validation"

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


UNHEALTHY = {"error": "unhealthy", "error_type": "healthcheck"}
