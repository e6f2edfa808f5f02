"""Builds one step's flat model inputs from a StepPlan: no padding between sequences.

Token order in the flat batch: one-token rows (decodes) first, then prefill chunks. Positions,
cache slots and the attention metadata are computed with numpy, then moved to the device once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgserve.engine.scheduler import ScheduledSeq, StepPlan
from tgserve.layers.attention import NULL_BLOCK, AttentionInputs, PrefillChunk
from tgserve.layers.cross_attention import CrossInputs, EncoderBatch


@dataclass(frozen=True, slots=True)
class BatchInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionInputs
    sample_indices: torch.Tensor  # [num_sampling] flat index of each sampling row's last token, plan order
    starts: list[int]  # flat index of the first token of each scheduled sequence, plan order
    cross: CrossInputs | None = None  # encoder-decoder models only


def _slots(block_ids: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    pos = np.arange(start, stop)
    return np.asarray(block_ids, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


def build_inputs(plan: StepPlan, block_size: int, device: torch.device) -> BatchInputs:
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

    chunks: list[PrefillChunk] = []
    start = num_decode
    for s in prefills:
        seq, c, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
        ids.extend(seq.token_ids[c:c + n])
        positions.append(np.arange(c, c + n, dtype=np.int64))
        slots.append(_slots(seq.block_ids, c, c + n, block_size))
        chunks.append(_chunk(seq.block_ids, start, n, c, block_size, device))
        first_index[id(s)] = start
        start += n
        last_index[id(s)] = start - 1

    # a sequence's new forks sample from its row too
    sample_indices = [last_index[id(s)] for s in plan.scheduled if s.samples for _ in range(1 + len(s.forks))]
    table, lens, mask = _decode_table(decodes, block_size, device) if decodes else (None, None, None)
    return BatchInputs(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.from_numpy(np.concatenate(positions)).to(device),
        attn=AttentionInputs(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
            num_decode=num_decode,
            decode_block_table=table,
            decode_seq_lens=lens,
            decode_mask=mask,
            prefills=tuple(chunks),
        ),
        sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=device),
        starts=[first_index[id(s)] for s in plan.scheduled],
        cross=_cross(plan, decodes, prefills, block_size, device),
    )


def _cross(plan: StepPlan, decodes: list[ScheduledSeq], prefills: list[ScheduledSeq], block_size: int,
           device: torch.device) -> CrossInputs | None:
    """Cross-attention metadata (decode rows, then chunks, in the flat order) and the encoder's inputs."""
    if not any(s.seq.encoder_ids is not None for s in plan.scheduled):
        return None
    table = lens = mask = None
    if decodes:
        lengths = np.array([len(s.seq.encoder_ids) for s in decodes], dtype=np.int64)
        max_blocks = int(-(-lengths.max() // block_size))
        rows = np.full((len(decodes), max_blocks), NULL_BLOCK, dtype=np.int64)
        for row, s in enumerate(decodes):
            rows[row, :len(s.seq.cross_block_ids)] = s.seq.cross_block_ids
        keys = np.arange(max_blocks * block_size)[None, :] < lengths[:, None]
        table, lens = torch.from_numpy(rows).to(device), torch.from_numpy(lengths).to(device)
        mask = torch.from_numpy(keys).to(device)[:, None, None, :]
    chunks = tuple((torch.tensor(s.seq.cross_block_ids, dtype=torch.long, device=device), len(s.seq.encoder_ids))
                   for s in prefills)
    encoding = [s.seq for s in plan.scheduled if s.encodes]
    encode = None
    if encoding:
        ids = [t for seq in encoding for t in seq.encoder_ids]
        slots = np.concatenate([_slots(seq.cross_block_ids, 0, len(seq.encoder_ids), block_size) for seq in encoding])
        encode = EncoderBatch(torch.tensor(ids, dtype=torch.long, device=device),
                              [len(seq.encoder_ids) for seq in encoding], torch.from_numpy(slots).to(device))
    return CrossInputs(table, lens, mask, chunks, encode)


def _decode_table(decodes: list[ScheduledSeq], block_size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables padded with the null block, lengths, and which gathered key positions are real."""
    lengths = np.array([s.seq.num_computed_tokens + 1 for s in decodes], dtype=np.int64)
    max_blocks = int(-(-lengths.max() // block_size))
    table = np.full((len(decodes), max_blocks), NULL_BLOCK, dtype=np.int64)
    for row, s in enumerate(decodes):
        blocks = s.seq.block_ids[:max_blocks]
        table[row, :len(blocks)] = blocks
    mask = np.arange(max_blocks * block_size)[None, :] < lengths[:, None]  # [decodes, keys]
    return (torch.from_numpy(table).to(device), torch.from_numpy(lengths).to(device),
            torch.from_numpy(mask).to(device)[:, None, None, :])


def _chunk(block_ids: list[int], start: int, length: int, context: int, block_size: int,
           device: torch.device) -> PrefillChunk:
    if context == 0:
        return PrefillChunk(start, length, 0, None, None)
    total = context + length
    blocks = torch.tensor(block_ids[: -(-total // block_size)], dtype=torch.long, device=device)
    # query i sits at position context + i and sees every key up to there
    mask = torch.arange(total, device=device)[None, :] <= (context + torch.arange(length, device=device))[:, None]
    return PrefillChunk(start, length, context, blocks, mask)
