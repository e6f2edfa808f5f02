"""One request's life inside the engine: its tokens, how many are computed, and its KV blocks.

For an encoder-decoder model the prompt is the encoder's input: the sequence's own tokens start
with the decoder's start token, and the encoder's output lives as cross-attention K/V in blocks of
the sequence's own (`cross_block_ids`), written once when the sequence is first scheduled.
"""

from __future__ import annotations

import enum

import msgspec

from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest, Sibling


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Mutable, owned by the scheduler. Prefill, decode, chunking and resume are one rule:
    `num_computed_tokens` catches up with `num_tokens`, and a sequence samples when they meet."""

    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "num_computed_tokens", "block_ids",
        "sampling", "stopping", "status", "arrival_time", "siblings", "num_prompt_logprobs",
        "encoder_ids", "cross_block_ids", "encoded", "block_hashes", "num_registered_blocks",
    )

    def __init__(self, request: AddRequest, decoder_start: int | None = None):
        self.request_id = request.request_id
        # encoder-decoder: the prompt feeds the encoder; the decoder begins at its start token
        self.encoder_ids: list[int] | None = list(request.prompt_ids) if decoder_start is not None else None
        first = [decoder_start] if decoder_start is not None else list(request.prompt_ids)
        self.token_ids: list[int] = first + list(request.generated_ids)
        self.num_prompt_tokens = len(first)
        self.cross_block_ids: list[int] = []
        self.encoded = False  # its cross-attention K/V are in its cross blocks
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.sampling: SamplingParams = request.sampling
        self.stopping: StoppingParams = request.stopping
        self.status = SequenceStatus.WAITING
        self.arrival_time = request.arrival_time
        self.siblings: list[Sibling] = list(request.siblings)  # forked once the prompt is computed
        # prompt positions whose logprob was reported (the first token has none); a recomputed
        # prefill does not report them twice
        self.num_prompt_logprobs = 1
        self.block_hashes: list[int] = []  # prefix-cache hashes of its first full blocks (kv_cache.py)
        self.num_registered_blocks = 0  # of its blocks, those registered in the prefix cache

    def fork(self, sibling: Sibling) -> "Sequence":
        """A sibling at this sequence's point: same tokens and parameters, its own seed and id.
        The caller shares the KV blocks (KVCacheManager.fork)."""
        child = Sequence.__new__(Sequence)
        child.request_id = sibling.request_id
        child.token_ids = list(self.token_ids)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.block_ids = []
        child.sampling = msgspec.structs.replace(self.sampling, seed=sibling.seed, prompt_logprobs=False)
        child.stopping = self.stopping
        child.status = self.status
        child.arrival_time = self.arrival_time
        child.siblings = []
        child.num_prompt_logprobs = self.num_prompt_tokens
        child.encoder_ids = self.encoder_ids
        child.cross_block_ids = []
        child.encoded = True  # it shares the parent's cross blocks, written in the step that forks it
        child.block_hashes = list(self.block_hashes)
        child.num_registered_blocks = self.num_registered_blocks
        return child

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
