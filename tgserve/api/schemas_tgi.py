"""TGI's request JSON as pydantic models (types checked strictly, unknown fields ignored).

Responses are plain dicts serialised with orjson on the hot path; their shapes are built in
routes_tgi.py and pinned by tests.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]


class Grammar(BaseModel):
    """TGI's tagged grammar: json (alias json_object) or json_schema with a JSON schema, regex with
    a pattern. Another type is a body error, as in TGI."""

    model_config = ConfigDict(strict=True)
    type: Literal["json", "json_object", "json_schema", "regex"]
    value: Any


class GenerateParameters(BaseModel):
    model_config = ConfigDict(strict=True)

    best_of: U32 | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: U32 | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: U64 | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: U32 | None = None
    top_p: float | None = None
    truncate: U32 | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None
    # tgserve extension (TGI's proto field; used by benchmarks): do not stop at EOS
    ignore_eos_token: bool = False


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    inputs: str
    parameters: GenerateParameters | None = None


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


# ---- responses (for the OpenAPI description; routes write the same shapes as plain dicts) ------------


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class SequenceDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class BestOfSequence(SequenceDetails):
    generated_text: str


class Details(SequenceDetails):
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One server-sent event (`data:` + this JSON) per generated token."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None
    details: StreamDetails | None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    model_dtype: str | None
    model_device_type: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_input_length: int
    waiting_served_ratio: float
    max_batch_total_tokens: int | None
    max_batch_prefill_tokens: int | None
    max_waiting_tokens: int
    max_batch_size: int | None
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    model_implementation: Literal["native", "transformers"] | None  # which path serves the model


class TokenizedToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[TokenizedToken]
    templated_text: str
