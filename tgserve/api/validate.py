"""The gate between a request's wire parameters and the engine: TGI's rules, order and messages.

Produces a `ValidRequest` (prompt token ids + SamplingParams + StoppingParams + response flags) or
raises `ValidationError`. Tokenization and grammar compilation run on worker threads so the event
loop never waits on them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from tgserve.api.errors import ValidationError
from tgserve.api.schemas_tgi import GenerateParameters, Grammar
from tgserve.api.tokenizer import Tokenizer
from tgserve.config import ServerConfig
from tgserve.params import GrammarSpec, SamplingParams, StoppingParams

# compiles a grammar against the model's tokenizer: None when it is usable, else the reason
GrammarCheck = Callable[[GrammarSpec], "str | None"]


@dataclass(frozen=True, slots=True)
class ValidRequest:
    inputs: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    details: bool
    return_full_text: bool
    seed: int | None  # reported in details; None when decoding is greedy
    decoder_input_details: bool = False
    # more sequences of the same prompt (TGI's best_of, OpenAI's n): their seeds
    sibling_seeds: tuple[int, ...] = ()

    @property
    def num_sequences(self) -> int:
        return 1 + len(self.sibling_seeds)


def samples(p: GenerateParameters) -> bool:
    """TGI's router rule (best_of's check): sampling asked for, or any warper set."""
    return p.do_sample or any(x is not None for x in (p.temperature, p.top_k, p.top_p, p.typical_p))


def check_parameters(p: GenerateParameters, inputs: str, stream: bool, cfg: ServerConfig) -> None:
    """Everything that needs no tokenizer, in TGI's order (the grammar comes last, after the
    lengths: `Validator.validate`)."""
    best_of = p.best_of if p.best_of is not None else 1
    if stream and best_of != 1:  # stream routes check these two before anything else
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if stream and p.decoder_input_details:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    if best_of != 1:
        if cfg.max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of == 0 or best_of > cfg.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {cfg.max_best_of}. Given: {best_of}")
    if best_of > 1 and not samples(p):
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if p.temperature is not None and p.temperature <= 0:
        raise ValidationError("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > cfg.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {cfg.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
    if best_of > 1 and p.seed is not None:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    if p.top_n_tokens is not None and p.top_n_tokens > cfg.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {p.top_n_tokens}")
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    if p.truncate is not None and not 0 < p.truncate <= cfg.max_input_tokens:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {cfg.max_input_tokens}. Given: {p.truncate}")
    if any(not s for s in p.stop):
        raise ValidationError("`stop` sequences cannot be empty")


def normalise_grammar(grammar: Grammar, cfg: ServerConfig) -> GrammarSpec:
    """TGI's grammar rules: json / json_object take a JSON schema (an object, or a string holding
    one) that is a valid draft 2020-12 schema with `properties`; json_schema takes {name?, schema};
    regex takes a pattern. The library's own compilation is checked later, off the event loop."""
    if cfg.disable_grammar_support:
        raise ValidationError("grammar is not supported")
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise ValidationError("grammar is not supported")
        return GrammarSpec("regex", grammar.value)
    value: Any = grammar.value
    if grammar.type == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise ValidationError("grammar is not valid: `json_schema` needs a `schema` object")
        value = value["schema"]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValidationError(f"grammar is not valid: {e}") from None
    if not isinstance(value, dict):
        raise ValidationError("grammar is not supported")
    import jsonschema  # imported on first use: most requests carry no grammar

    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as e:
        raise ValidationError(f"grammar is not valid: {e.message}") from None
    if grammar.type != "json_schema" and "properties" not in value:
        raise ValidationError("grammar is not valid: Grammar must have a 'properties' field")
    return GrammarSpec("json_schema", json.dumps(value))


class Validator:
    def __init__(self, tokenizer: Tokenizer, cfg: ServerConfig, grammar_check: GrammarCheck | None = None):
        self.tokenizer, self.cfg, self.grammar_check = tokenizer, cfg, grammar_check
        self.pool = ThreadPoolExecutor(cfg.validation_workers, thread_name_prefix="validation")

    async def validate(self, inputs: str, params: GenerateParameters | None, stream: bool,
                       return_full_text_default: bool = False) -> ValidRequest:
        # TGI: an omitted `parameters` object means sampling; a present-but-empty one means greedy
        p = params if params is not None else GenerateParameters(do_sample=True)
        check_parameters(p, inputs, stream, self.cfg)
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self.pool, self.tokenizer.encode, inputs)
        valid = self.finish(inputs, ids, p, return_full_text_default)
        if p.grammar is None:
            return valid
        grammar = await loop.run_in_executor(self.pool, self.check_grammar, p.grammar)
        return dataclasses.replace(valid, sampling=msgspec.structs.replace(valid.sampling, grammar=grammar))

    def check_grammar(self, grammar: Grammar) -> GrammarSpec:
        """TGI's grammar rules, then whether llguidance can build it (on a worker thread)."""
        spec = normalise_grammar(grammar, self.cfg)
        if self.grammar_check is None:  # no tokenizer llguidance can use
            raise ValidationError("grammar is not supported")
        error = self.grammar_check(spec)
        if error is not None:
            raise ValidationError(f"grammar is not valid: {error}")
        return spec

    def finish(self, inputs: str, ids: list[int], p: GenerateParameters, return_full_text_default: bool) -> ValidRequest:
        """Length checks on the tokenized prompt, then the engine's parameter sets."""
        cfg = self.cfg
        if p.truncate is not None:
            ids = ids[-p.truncate:]
        max_new = p.max_new_tokens if p.max_new_tokens is not None else max(cfg.max_total_tokens - len(ids), 0)
        if len(ids) + max_new > cfg.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
                f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`")
        if len(ids) > cfg.max_input_tokens:
            raise ValidationError(f"`inputs` must have less than {cfg.max_input_tokens} tokens. Given: {len(ids)}")
        if not ids:
            raise ValidationError("`inputs` cannot be empty")
        # the engine samples when asked to, or when any warper is active (TGI's shard rule)
        do_sample = (p.do_sample or p.temperature not in (None, 1.0) or p.top_k is not None
                     or p.top_p is not None or p.typical_p is not None)
        seed = (p.seed if p.seed is not None else secrets.randbits(64)) if do_sample else None
        best_of = p.best_of or 1
        sampling = SamplingParams(
            do_sample=do_sample, temperature=p.temperature or 1.0, top_k=p.top_k or 0,
            top_p=p.top_p or 1.0, typical_p=p.typical_p or 1.0,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
            frequency_penalty=p.frequency_penalty or 0.0, watermark=p.watermark,
            seed=seed or 0, top_n_tokens=p.top_n_tokens or 0, prompt_logprobs=p.decoder_input_details,
        )
        stopping = StoppingParams(
            max_new_tokens=max_new, stop_token_ids=self.tokenizer.eos_token_ids,
            ignore_eos=p.ignore_eos_token, stop_sequences=tuple(p.stop),
        )
        full_text = p.return_full_text if p.return_full_text is not None else return_full_text_default
        return ValidRequest(
            inputs, ids, sampling, stopping, p.details or p.decoder_input_details, full_text, seed,
            decoder_input_details=p.decoder_input_details,
            sibling_seeds=tuple(secrets.randbits(64) for _ in range(best_of - 1)),  # each draws its own, as in TGI
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
