"""The gate between a request's wire parameters and the engine: TGI's rules, order and messages.

Produces a `ValidRequest` (prompt token ids + SamplingParams + StoppingParams + response flags) or
raises `ValidationError`. Tokenization runs on worker threads so the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tgserve.api.errors import ValidationError
from tgserve.api.schemas_tgi import GenerateParameters
from tgserve.api.tokenizer import Tokenizer
from tgserve.config import ServerConfig
from tgserve.params import SamplingParams, StoppingParams


@dataclass(frozen=True, slots=True)
class ValidRequest:
    inputs: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    details: bool
    return_full_text: bool
    seed: int | None  # reported in details; None when decoding is greedy


# Parameters TGI has that this server does not implement yet: a non-default value is refused.
_NOT_YET = (
    ("best_of", lambda p: p.best_of is not None and p.best_of > 1),
    ("repetition_penalty", lambda p: p.repetition_penalty not in (None, 1.0)),
    ("frequency_penalty", lambda p: p.frequency_penalty not in (None, 0.0)),
    ("typical_p", lambda p: p.typical_p is not None),
    ("top_n_tokens", lambda p: bool(p.top_n_tokens)),
    ("watermark", lambda p: p.watermark),
    ("grammar", lambda p: p.grammar is not None),
    ("decoder_input_details", lambda p: p.decoder_input_details),
)


def check_parameters(p: GenerateParameters, inputs: str, stream: bool, cfg: ServerConfig) -> None:
    """Everything that needs no tokenizer, in TGI's order."""
    samples = p.do_sample or any(x is not None for x in (p.temperature, p.top_k, p.top_p, p.typical_p))
    best_of = p.best_of if p.best_of is not None else 1
    if best_of != 1:
        if best_of == 0 or best_of > cfg.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {cfg.max_best_of}. Given: {best_of}")
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if not samples:
            raise ValidationError("you must use sampling when `best_of` is > 1")
    if stream and p.decoder_input_details:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
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
    for name, used in _NOT_YET:
        if used(p):
            raise ValidationError(f"`{name}` is not supported by this server yet")


class Validator:
    def __init__(self, tokenizer: Tokenizer, cfg: ServerConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self._pool = ThreadPoolExecutor(cfg.validation_workers, thread_name_prefix="validation")

    async def validate(self, inputs: str, params: GenerateParameters | None, stream: bool,
                       return_full_text_default: bool = False) -> ValidRequest:
        # TGI: an omitted `parameters` object means sampling; a present-but-empty one means greedy
        p = params if params is not None else GenerateParameters(do_sample=True)
        check_parameters(p, inputs, stream, self.cfg)
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._pool, self.tokenizer.encode, inputs)
        return self.finish(inputs, ids, p, return_full_text_default)

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
        do_sample = p.do_sample or (p.temperature not in (None, 1.0)) or p.top_k is not None or p.top_p is not None
        seed = (p.seed if p.seed is not None else secrets.randbits(64)) if do_sample else None
        sampling = SamplingParams(
            do_sample=do_sample, temperature=p.temperature or 1.0, top_k=p.top_k or 0,
            top_p=p.top_p or 1.0, seed=seed or 0,
        )
        stopping = StoppingParams(
            max_new_tokens=max_new, stop_token_ids=self.tokenizer.eos_token_ids,
            ignore_eos=p.ignore_eos_token, stop_sequences=tuple(p.stop),
        )
        full_text = p.return_full_text if p.return_full_text is not None else return_full_text_default
        return ValidRequest(inputs, ids, sampling, stopping, p.details, full_text, seed)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
