"""How to choose each next token, and when to stop: the vocabulary both processes share.

Built by `api/validate.py` from a request's wire parameters, carried to the engine inside
`protocol.AddRequest`. Values are frozen msgspec structs so they cross the socket unchanged.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """Next-token choice for one request; the defaults switch every feature off (greedy)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    # Always set by the API (a random draw when the request gave none); a sampled row's randomness
    # is a pure function of (seed, position), so the same seed gives the same tokens at any load.
    seed: int = 0


class StoppingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """When generation ends. The engine checks token-level stops; the API checks stop strings."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()  # EOS ids of the model
    ignore_eos: bool = False
    stop_sequences: tuple[str, ...] = ()  # matched on text, by the API only
