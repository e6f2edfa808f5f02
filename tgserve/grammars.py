"""Grammars as llguidance sees them, shared by both processes: the API validates a request's
grammar with it, the engine builds matchers from it (tgserve/sampling/grammar.py). No tensors here.

Why llguidance (measured on this machine against xgrammar 0.2.8 and outlines-core 0.2.14, SmolLM2
tokenizer): a matcher is built lazily in ~1 ms where xgrammar compiles a JSON schema in 80-420 ms
and outlines-core in 0.1-4.7 s (+0.5 GB for a 15-property schema); a mask costs 0.02-0.06 ms with
no multi-ms spikes; mask filling and matcher construction release the GIL, so they run in a
thread while the model's forward pass runs; one small wheel with no dependencies; and its errors
say what is wrong ("Invalid type: nosuchtype", "unclosed group").

JSON schemas follow TGI (outlines) rather than the JSON Schema default: objects without
`additionalProperties` admit no extra keys, and the output is compact (no whitespace).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from tgserve.params import GrammarSpec

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False}


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object that lists its properties but says nothing of
    `additionalProperties` forbids extra keys (an object without `properties` stays open)."""
    if isinstance(schema, dict):
        schema = {k: close_objects(v) for k, v in schema.items()}
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [close_objects(v) for v in schema]
    return schema


def to_llguidance(spec: GrammarSpec) -> str:
    """The llguidance grammar for a validated spec (raises ValueError on a malformed schema)."""
    from llguidance import LLMatcher

    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(close_objects(json.loads(spec.value)), defaults=JSON_OPTIONS)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def load_tokenizer(folder: str, vocab_size: int | None, eos_ids: list[int] | None):
    """llguidance's view of the model's tokenizer (from tokenizer.json; ~0.2 s), or None when the
    model has no tokenizer.json or llguidance cannot read it (grammars are then unsupported)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        log.warning("no tokenizer.json in %s: requests with a grammar will be refused", folder)
        return None
    from llguidance import LLTokenizer

    try:
        # the EOS ids must be given: llguidance's guess from tokenizer.json can differ from the model's
        return LLTokenizer(path, n_vocab=vocab_size, eos_token=list(eos_ids) if eos_ids else None)
    except Exception as e:  # e.g. a config whose EOS id lies outside the tokenizer's vocabulary
        log.warning("llguidance cannot use %s (%s): requests with a grammar will be refused", path, e)
        return None


class GrammarChecker:
    """The API's check: does llguidance accept this grammar for this tokenizer?"""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, spec: GrammarSpec) -> str | None:
        from llguidance import LLMatcher

        try:
            grammar = to_llguidance(spec)
        except ValueError as e:
            return str(e)
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        return error.strip() or None


