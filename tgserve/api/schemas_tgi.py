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
