"""Builds one step's flat model inputs from a StepPlan: no padding between sequences.

Token order in the flat batch: one-token rows (decodes) first, then prefill chunks. Rank 0 builds
a `StepInputs` of host (numpy) arrays from the plan — all a rank needs to run the step, and what
a sharded engine sends to its other ranks — and every rank moves it to its device once
(`to_device` → `BatchInputs`), where the masks are derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tgserve.engine.scheduler import ScheduledSeq, StepPlan
from tgserve.layers.attention import NULL_BLOCK, AttentionInputs, PrefillChunk, key_mask
from tgserve.layers.cross_attention import CrossInputs, EncoderBatch

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class HostCross:
    """The cross-attention inputs of an encoder-decoder step (see CrossInputs)."""

    decode_table: np.ndarray | None  # [num_decode, max_blocks] cross blocks of the decode rows
    decode_lens: np.ndarray | None  # [num_decode] encoder length of each decode row
    chunks: tuple[tuple[np.ndarray, int], ...]  # (cross blocks, encoder length) per prefill chunk
    encode_ids: np.ndarray | None  # encoder tokens of the sequences admitted this step, flat
    encode_lengths: tuple[int, ...]
    encode_slots: np.ndarray | None


@dataclass(frozen=True, slots=True)
class StepInputs:
    """Everything the model computes in one step, as host arrays."""

    block_size: int
    block_copies: tuple[tuple[int, int], ...]  # (source, destination) before the forward pass
    input_ids: np.ndarray  # [num_tokens]
    positions: np.ndarray  # [num_tokens]
    slot_mapping: np.ndarray  # [num_tokens]
    num_decode: int
    decode_table: np.ndarray | None  # [num_decode, max_blocks], padded with the null block
    decode_lens: np.ndarray | None  # [num_decode]
    prefills: tuple[tuple[int, int, int, np.ndarray | None], ...]  # (start, length, context, blocks)
    sample_indices: np.ndarray  # flat index of each sampling row's last token, plan order
    starts: tuple[int, ...]  # flat index of the first token of each scheduled sequence, plan order
    cross: HostCross | None = None
    # prompt logprobs: the flat rows whose logits are wanted, and the token each row is scored at
    logprob_rows: np.ndarray = field(default_factory=lambda: _EMPTY)
    logprob_targets: np.ndarray = field(default_factory=lambda: _EMPTY)
    # every token as one query row over the cache (see _row_table), or None
    row_table: np.ndarray | None = None  # [num_tokens, max_blocks]
    row_lens: np.ndarray | None = None  # [num_tokens]

    def to_device(self, device: torch.device) -> BatchInputs:
        def move(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a).to(device)

        table, lens = move(self.decode_table), move(self.decode_lens)
        return BatchInputs(
            input_ids=move(self.input_ids),
            positions=move(self.positions),
            attn=AttentionInputs(
                slot_mapping=move(self.slot_mapping),
                num_decode=self.num_decode,
                decode_block_table=table,
                decode_seq_lens=lens,
                block_size=self.block_size,
                prefills=tuple(_chunk(start, length, context, move(blocks), device)
                               for start, length, context, blocks in self.prefills),
                row_table=move(self.row_table),
                row_lens=move(self.row_lens),
            ),
            sample_indices=move(self.sample_indices),
            starts=list(self.starts),
            cross=None if self.cross is None else _cross_to_device(self.cross, self.block_size, move),
        )


@dataclass(frozen=True, slots=True)
class BatchInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionInputs
    sample_indices: torch.Tensor  # [num_sampling] flat index of each sampling row's last token, plan order
    starts: list[int]  # flat index of the first token of each scheduled sequence, plan order
    cross: CrossInputs | None = None  # encoder-decoder models only


def build_inputs(plan: StepPlan, block_size: int, device: torch.device) -> BatchInputs:
    return step_inputs(plan, block_size).to_device(device)


def _slots(block_ids: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    pos = np.arange(start, stop)
    return np.asarray(block_ids, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


def step_inputs(plan: StepPlan, block_size: int) -> StepInputs:
    decodes = [s for s in plan.scheduled if s.num_tokens == 1]
    prefills = [s for s in plan.scheduled if s.num_tokens > 1]
    num_decode = len(decodes)

    ids: list[int] = [s.seq.token_ids[s.seq.num_computed_tokens] for s in decodes]
    positions: list[np.ndarray] = [np.array([s.seq.num_computed_tokens for s in decodes], dtype=np.int64)]
    slots: list[np.ndarray] = [np.array(
        [s.seq.block_ids[s.seq.num_computed_tokens // block_size] * block_size
         + s.seq.num_computed_tokens % block_size for s in decodes], dtype=np.int64)]
    last_index: dict[int, int] = {id(s): i for i, s in enumerate(decodes)}
    first_index: dict[int, int] = dict(last_index)

    chunks: list[tuple[int, int, int, np.ndarray | None]] = []
    start = num_decode
    for s in prefills:
        seq, c, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
        ids.extend(seq.token_ids[c:c + n])
        positions.append(np.arange(c, c + n, dtype=np.int64))
        slots.append(_slots(seq.block_ids, c, c + n, block_size))
        blocks = np.asarray(seq.block_ids[: -(-(c + n) // block_size)], dtype=np.int64) if c else None
        chunks.append((start, n, c, blocks))
        first_index[id(s)] = start
        start += n
        last_index[id(s)] = start - 1

    # a sequence's new forks sample from its row too
    sample_indices = [last_index[id(s)] for s in plan.scheduled if s.samples for _ in range(1 + len(s.forks))]
    table, lens = _decode_table(decodes, block_size) if decodes else (None, None)
    row_table, row_lens = _row_table(decodes, prefills, block_size)
    starts = tuple(first_index[id(s)] for s in plan.scheduled)
    rows, targets = prompt_logprob_rows(plan, starts)
    return StepInputs(
        block_size=block_size,
        block_copies=plan.block_copies,
        input_ids=np.asarray(ids, dtype=np.int64),
        positions=np.concatenate(positions),
        slot_mapping=np.concatenate(slots),
        num_decode=num_decode,
        decode_table=table,
        decode_lens=lens,
        prefills=tuple(chunks),
        row_table=row_table,
        row_lens=row_lens,
        sample_indices=np.asarray(sample_indices, dtype=np.int64),
        starts=starts,
        cross=_cross(plan, decodes, prefills, block_size),
        logprob_rows=rows,
        logprob_targets=targets,
    )


def prompt_logprob_spans(plan: StepPlan) -> list[tuple[int, int, int]]:
    """(index in the plan, first, last) for each sequence that reports prompt logprobs this step:
    the hidden state at position p (first ≤ p < last) scores the prompt token at p + 1. Positions
    already reported (a recomputed prefill) are skipped."""
    spans = []
    for index, item in enumerate(plan.scheduled):
        seq = item.seq
        if not seq.sampling.prompt_logprobs:
            continue
        computed = seq.num_computed_tokens
        first = max(computed, seq.num_prompt_logprobs - 1)
        last = min(computed + item.num_tokens, seq.num_prompt_tokens - 1)
        if first < last:
            spans.append((index, first, last))
    return spans


def prompt_logprob_rows(plan: StepPlan, starts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rows, targets = [], []
    for index, first, last in prompt_logprob_spans(plan):
        seq = plan.scheduled[index].seq
        start = starts[index] - seq.num_computed_tokens
        rows.append(np.arange(start + first, start + last))
        targets.extend(seq.token_ids[first + 1:last + 1])
    if not rows:
        return _EMPTY, _EMPTY
    return np.concatenate(rows), np.asarray(targets, dtype=np.int64)


def _cross(plan: StepPlan, decodes: list[ScheduledSeq], prefills: list[ScheduledSeq],
           block_size: int) -> HostCross | None:
    """Cross-attention inputs (decode rows, then chunks, in the flat order) and the encoder's inputs."""
    if not any(s.seq.encoder_ids is not None for s in plan.scheduled):
        return None
    table = lens = None
    if decodes:
        lens = np.array([len(s.seq.encoder_ids) for s in decodes], dtype=np.int64)
        table = np.full((len(decodes), int(-(-lens.max() // block_size))), NULL_BLOCK, dtype=np.int64)
        for row, s in enumerate(decodes):
            table[row, :len(s.seq.cross_block_ids)] = s.seq.cross_block_ids
    chunks = tuple((np.asarray(s.seq.cross_block_ids, dtype=np.int64), len(s.seq.encoder_ids)) for s in prefills)
    encoding = [s.seq for s in plan.scheduled if s.encodes]
    if not encoding:
        return HostCross(table, lens, chunks, None, (), None)
    ids = np.asarray([t for seq in encoding for t in seq.encoder_ids], dtype=np.int64)
    slots = np.concatenate([_slots(seq.cross_block_ids, 0, len(seq.encoder_ids), block_size) for seq in encoding])
    return HostCross(table, lens, chunks, ids, tuple(len(seq.encoder_ids) for seq in encoding), slots)


def _cross_to_device(cross: HostCross, block_size: int, move) -> CrossInputs:
    table, lens = move(cross.decode_table), move(cross.decode_lens)
    encode = None
    if cross.encode_ids is not None:
        encode = EncoderBatch(move(cross.encode_ids), list(cross.encode_lengths), move(cross.encode_slots))
    return CrossInputs(table, lens, None if lens is None else key_mask(lens, table.shape[1] * block_size),
                       tuple((move(blocks), length) for blocks, length in cross.chunks), encode)


def _decode_table(decodes: list[ScheduledSeq], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Block tables padded with the null block, and lengths."""
    lengths = np.array([s.seq.num_computed_tokens + 1 for s in decodes], dtype=np.int64)
    max_blocks = int(-(-lengths.max() // block_size))
    table = np.full((len(decodes), max_blocks), NULL_BLOCK, dtype=np.int64)
    for row, s in enumerate(decodes):
        blocks = s.seq.block_ids[:max_blocks]
        table[row, :len(blocks)] = blocks
    return table, lengths


# prompt chunks up to this long are attended as rows of the decode kernel (see _row_table)
ROW_CHUNK_TOKENS = 64


def _row_table(decodes: list[ScheduledSeq], prefills: list[ScheduledSeq], block_size: int
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """For a step with prompt chunks, all short: each token of the step as one query row over its
    sequence's cached keys — a decode its own, the token at position p of a chunk the keys up to p
    (the chunk's own keys are in the cache before attention runs) — so that attention can run the
    whole step as one call of the decode kernel instead of one call per chunk (per layer). Block
    tables padded with the null block, and lengths; (None, None) for other steps."""
    if not prefills or any(s.num_tokens > ROW_CHUNK_TOKENS for s in prefills):
        return None, None
    lengths = [s.seq.num_computed_tokens + 1 for s in decodes]
    for s in prefills:
        c = s.seq.num_computed_tokens
        lengths.extend(range(c + 1, c + s.num_tokens + 1))
    lens = np.asarray(lengths, dtype=np.int64)
    max_blocks = int(-(-lens.max() // block_size))
    table = np.full((len(lens), max_blocks), NULL_BLOCK, dtype=np.int64)
    row = 0
    for s in decodes + prefills:
        blocks = s.seq.block_ids[:max_blocks]
        table[row:row + s.num_tokens, :len(blocks)] = blocks
        row += s.num_tokens
    return table, lens


def _chunk(start: int, length: int, context: int, blocks: torch.Tensor | None, device: torch.device) -> PrefillChunk:
    if context == 0:
        return PrefillChunk(start, length, 0, None, None)
    # query i sits at position context + i and sees every key up to there
    total = context + length
    mask = torch.arange(total, device=device)[None, :] <= (context + torch.arange(length, device=device))[:, None]
    return PrefillChunk(start, length, context, blocks, mask)
