"""How to choose each next token, and when to stop: the vocabulary both processes share.

Built by `api/validate.py` from a request's wire parameters, carried to the engine inside
`protocol.AddRequest`. Values are frozen msgspec structs so they cross the socket unchanged.
"""

from __future__ import annotations

import msgspec


class GrammarSpec(msgspec.Struct, frozen=True, array_like=True):
    """A constraint on the generated text, already validated by the API."""

    kind: str  # "json_schema" (value: the schema as JSON text) or "regex"
    value: str


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """Next-token choice for one request; the defaults switch every feature off (greedy).

    Processing order (TGI's, with OpenAI's stages where TGI has none): watermark → repetition
    penalty → frequency penalty → OpenAI presence/frequency penalties → logit bias → grammar mask,
    then, for sampled rows only, temperature → top-k → top-p → typical-p.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    typical_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    frequency_penalty: float = 0.0  # TGI's: count / length over prompt and generated tokens; 0.0: off
    # OpenAI's penalties: over generated tokens only, raw counts (logit -= f * count + p * [count > 0])
    output_frequency_penalty: float = 0.0
    output_presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    watermark: bool = False
    grammar: GrammarSpec | None = None
    # Always set by the API (a random draw when the request gave none); a sampled row's randomness
    # is a pure function of (seed, position), so the same seed gives the same tokens at any load.
    seed: int = 0
    top_n_tokens: int = 0  # report this many best alternatives with each generated token
    prompt_logprobs: bool = False  # report each prompt token's logprob (TGI's decoder_input_details)

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0

    @property
    def uses_output_penalty(self) -> bool:
        return self.output_frequency_penalty != 0.0 or self.output_presence_penalty != 0.0


class StoppingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """When generation ends. The engine checks token-level stops; the API checks stop strings."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()  # EOS ids of the model
    ignore_eos: bool = False
    stop_sequences: tuple[str, ...] = ()  # matched on text, by the API only
