"""Messages between the API process and the engine process, and how they are framed.

Transport: ZeroMQ PUSH/PULL pairs over `ipc://` (unix domain) sockets, one msgpack frame per message.
The API binds both sockets (it outlives engine restarts); the engine and the launcher connect.
Engine → API carries one `StepOutputs` per step, however many requests it holds.
"""

from __future__ import annotations

import enum
import os

import msgspec

from tgserve.params import SamplingParams, StoppingParams


class FinishReason(str, enum.Enum):
    """TGI's names. Aborts and errors are not finish reasons; they travel separately."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


# ---- API → engine ---------------------------------------------------------------------------------


class Sibling(msgspec.Struct, frozen=True, array_like=True):
    """One more sequence of the same request (best_of, n): it shares the prompt's KV blocks and
    differs only in its seed."""

    request_id: str
    seed: int


class AddRequest(msgspec.Struct, frozen=True, tag=True, array_like=True):
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    arrival_time: float
    # Tokens generated before an engine restart; prefilled with the prompt, then generation goes on.
    generated_ids: list[int] = []
    # Sequences forked from this one when its prompt is computed: no second prefill.
    siblings: list[Sibling] = []


class Abort(msgspec.Struct, frozen=True, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, frozen=True, tag=True, array_like=True):
    pass


ToEngine = AddRequest | Abort | Shutdown


# ---- engine → API ---------------------------------------------------------------------------------


class SeqOutput(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """What one request got from one step: new tokens, and its end if it ended."""

    request_id: str
    token_ids: list[int] = []
    logprobs: list[float] = []
    finish_reason: FinishReason | None = None
    error: str | None = None  # the engine failed this request (TGI's 424 "generation" error)
    # with top_n_tokens: for each new token, the best alternatives (ids, logprobs), ties included
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    # with prompt_logprobs: logprobs of the next prompt tokens, in order, each position sent once
    prompt_logprobs: list[float] = []


class EngineStats(msgspec.Struct, frozen=True, array_like=True):
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_batched_tokens: int = 0  # tokens computed in the step these stats follow
    step_seconds: float = 0.0
    prefix_cache_hit_tokens: int = 0  # prompt tokens served from the prefix cache, since start
    phases: dict[str, float] = msgspec.field(default_factory=dict)  # the step's seconds per phase (engine/profile.py)


class StepOutputs(msgspec.Struct, frozen=True, tag=True, array_like=True):
    outputs: list[SeqOutput]
    stats: EngineStats


class Ready(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Sent once the model is loaded and warmed up: facts learned at start-up."""

    num_blocks: int
    block_size: int
    max_batch_total_tokens: int
    dtype: str
    device: str
    implementation: str = "native"  # or "transformers": the fallback serves the architecture
    encoder_decoder: bool = False  # the prompt feeds an encoder; generated text follows no prompt


class EngineFailed(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """The engine cannot serve (failed to load, or its process died): every request fails."""

    reason: str


ToApi = StepOutputs | Ready | EngineFailed


# ---- framing --------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
decode_to_engine = msgspec.msgpack.Decoder(ToEngine).decode
decode_to_api = msgspec.msgpack.Decoder(ToApi).decode


def to_engine_address(ipc_dir: str) -> str:
    return "ipc://" + os.path.join(ipc_dir, "to-engine")


def to_api_address(ipc_dir: str) -> str:
    return "ipc://" + os.path.join(ipc_dir, "to-api")
