"""The one loop over each engine step's outputs: detokenize, stop strings, events to each request.

Everything the API does per generated token happens here, so the routes only format events.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from tgserve.api.detokenizer import IncrementalDetokenizer
from tgserve.api.errors import GenerationError, InferError
from tgserve.api.stop import StopMatcher
from tgserve.api.tokenizer import Tokenizer
from tgserve.api.validate import ValidRequest
from tgserve.protocol import FinishReason, StepOutputs


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True, slots=True)
class FinalResult:
    generated_text: str  # the completion only; routes prepend the prompt for return_full_text
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    token: Token
    top_tokens: list[Token] | None  # with top_n_tokens: the best alternatives for this position
    final: FinalResult | None  # set on the last token


EventQueue = asyncio.Queue  # of (RequestState, StreamEvent | InferError)


class RequestState:
    """One sequence of a request inside the API, owned by the engine client until it ends. A
    best_of request has one per sequence; the first holds the others in `siblings`."""

    __slots__ = ("request_id", "valid", "seed", "generated_ids", "tokens", "top_tokens", "prefill_logprobs",
                 "siblings", "detok", "stop", "events", "created", "first_token_at", "finished_at", "final",
                 "error", "context_ids")

    def __init__(self, request_id: str, valid: ValidRequest, tokenizer: Tokenizer, events: "EventQueue",
                 seed: int | None = None, follows_prompt: bool = True):
        """`follows_prompt`: the generated text continues the prompt (False for an encoder-decoder,
        whose prompt is the encoder's input)."""
        self.request_id = request_id
        self.valid = valid
        self.seed = valid.seed if seed is None else seed
        self.generated_ids: list[int] = []  # the journal: what a restarted engine would resume from
        self.tokens: list[Token] = []
        self.top_tokens: list[list[Token]] = []  # one list per generated token, with top_n_tokens
        self.prefill_logprobs: list[float] = []  # prompt tokens 1.. (decoder_input_details)
        self.siblings: list[RequestState] = []
        self.context_ids = valid.prompt_ids if follows_prompt else []  # what the first token is decoded after
        self.detok = IncrementalDetokenizer(tokenizer, self.context_ids)
        stops = valid.stopping.stop_sequences
        self.stop = StopMatcher(stops) if stops else None
        self.events = events  # shared by every sequence one HTTP request asked for
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.final: FinalResult | None = None
        self.error: InferError | None = None

    def fail(self, error: InferError) -> None:
        self.error = error
        self.finished_at = time.monotonic()
        self.events.put_nowait((self, error))


def process_step(step: StepOutputs, states: dict[str, RequestState], tokenizer: Tokenizer,
                 abort: Callable[[list[str]], None]) -> None:
    now = time.monotonic()
    stopped: list[str] = []
    for out in step.outputs:
        state = states.get(out.request_id)
        if state is None:  # already ended here (stop string, disconnect); the engine's tail is dropped
            continue
        if out.error is not None:
            state.fail(GenerationError(f"Server error: {out.error}"))
            del states[out.request_id]
            continue
        state.prefill_logprobs.extend(out.prompt_logprobs)
        if not out.token_ids:
            continue
        if state.first_token_at is None:
            state.first_token_at = now
        last = len(out.token_ids) - 1
        for i, (token_id, logprob) in enumerate(zip(out.token_ids, out.logprobs)):
            text = state.detok.step(token_id)
            reason = out.finish_reason if i == last else None
            if reason is None and state.stop is not None and state.stop.feed(text):
                reason = FinishReason.STOP_SEQUENCE
                stopped.append(out.request_id)  # the engine would go on: tell it to stop
            token = Token(token_id, text, logprob, token_id in tokenizer.special_ids)
            state.tokens.append(token)
            state.generated_ids.append(token_id)
            top = None
            if out.top_ids:
                top = [Token(t, text, lp, t in tokenizer.special_ids) for t, text, lp in
                       zip(out.top_ids[i], tokenizer.decode_each(out.top_ids[i]), out.top_logprobs[i])]
                state.top_tokens.append(top)
            final = None
            if reason is not None:
                final = FinalResult(
                    generated_text=tokenizer.decode_generated(state.context_ids, state.generated_ids),
                    finish_reason=reason, generated_tokens=len(state.generated_ids), seed=state.seed,
                )
                state.final, state.finished_at = final, now
                del states[out.request_id]
            state.events.put_nowait((state, StreamEvent(token, top, final)))
            if final is not None:
                break
    if stopped:
        abort(stopped)
