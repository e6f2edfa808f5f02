"""Attention over the paged KV cache, and the inputs it needs (built by engine/inputs.py).

The cache of one layer is two tensors `[num_blocks, block_size, kv_heads, head_dim]`, zero-filled
at start; a sequence owns a list of blocks (its block table). Block 0 is the null block: never
handed out, and padded block tables point at it (masked: no real row reads it). It stays zero,
except that the padded rows of a CUDA graph's batch write their K/V to its first slot
(engine/graphs.py): finite values, read only by those padded rows.
Each step's flat batch puts single-token rows (decodes) first, attended in one batched call (a
native kernel that walks the block tables on CPU, else block gather + SDPA), then prefill chunks,
each attended on its own (their lengths differ, and each call is large).

Options models switch on (shared by every architecture that needs them): a sliding window (a query
sees the `window` most recent keys, itself included), ALiBi (score += slope[head] × key position,
as BLOOM adds it), logit soft-capping (score = cap × tanh(score / cap), Gemma 2), and a learned
relative position bias (T5). With any of them, attention takes the explicit path (masks and
biases built per step) instead of the kernel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tgserve.layers import cpu_kernels

NULL_BLOCK = 0


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    start: int  # index of the chunk's first token in the flat batch
    length: int  # new tokens in this step
    context_len: int  # tokens of this sequence already in the cache
    block_ids: torch.Tensor | None  # [num_blocks] when context_len > 0: blocks to read
    mask: torch.Tensor | None  # [length, context_len + length] bool, True = may attend


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """What attention layers read for one step (shared by all layers)."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V goes to
    num_decode: int  # the first num_decode tokens are one-token rows
    decode_block_table: torch.Tensor | None  # [num_decode, max_blocks] int64, padded with NULL_BLOCK
    decode_seq_lens: torch.Tensor | None  # [num_decode] int64, keys each decode row attends to
    block_size: int
    prefills: tuple[PrefillChunk, ...]
    # steps with short prompt chunks: every token as one query row over the cache (the decode
    # kernel's layout; a prompt token sees its sequence's keys up to its own position), else None
    row_table: torch.Tensor | None = None  # [num_tokens, max_blocks] int64, padded with NULL_BLOCK
    row_lens: torch.Tensor | None = None  # [num_tokens] int64
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # built on first use

    def decode_mask(self) -> torch.Tensor | None:
        """[num_decode, 1, 1, max_blocks * block_size] bool, True = a real key, for the PyTorch decode
        path; built on first use (the native kernel reads the lengths: most steps never build it)."""
        if self.decode_seq_lens is None:
            return None
        if "decode" not in self._masks:
            self._masks["decode"] = key_mask(self.decode_seq_lens, self.decode_block_table.shape[1] * self.block_size)
        return self._masks["decode"]


def key_mask(lengths: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[rows, 1, 1, keys]: which gathered key positions are real."""
    return (torch.arange(num_keys, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


class AttentionClock:
    """Seconds spent in attention layers since the last `take` (the engine's step profile reads it;
    one counter per process: a step runs its layers one after another)."""

    seconds = 0.0

    @classmethod
    def take(cls) -> float:
        spent, cls.seconds = cls.seconds, 0.0
        return spent


class PagedAttention(nn.Module):
    """Writes this step's K/V into the cache, then attends every query to its sequence's keys."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, *,
                 sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                 logit_softcap: float | None = None, position_bias: nn.Module | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.window, self.softcap = sliding_window, logit_softcap
        # [num_heads] slopes of this rank's heads, float32
        self.register_buffer("alibi", None if alibi_slopes is None else alibi_slopes.float(), persistent=False)
        # a module (query positions, key positions) → additive bias broadcast to [b, heads, queries,
        # keys] (T5's bucketed relative positions); kept out of this module's parameters (it is shared)
        self._position_bias = [position_bias] if position_bias is not None else []
        self.plain = (sliding_window is None and alibi_slopes is None and logit_softcap is None
                      and position_bias is None)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        start = time.perf_counter()
        out = self._attend(q, k, v, attn)
        AttentionClock.seconds += time.perf_counter() - start  # the step profile's "attention"
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        # q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] → [tokens, heads * head_dim]
        if not cpu_kernels.write_kv(k, v, self.k_cache, self.v_cache, attn.slot_mapping):
            num_blocks, block_size = self.k_cache.shape[:2]
            k_slots = self.k_cache.view(num_blocks * block_size, self.num_kv_heads, self.head_dim)
            v_slots = self.v_cache.view(num_blocks * block_size, self.num_kv_heads, self.head_dim)
            k_slots.index_copy_(0, attn.slot_mapping, k)
            v_slots.index_copy_(0, attn.slot_mapping, v)

        d = attn.num_decode
        if d and d == q.shape[0]:  # decodes only: their output is the layer's
            return self._decode(q, attn).reshape(d, self.num_heads * self.head_dim)
        if attn.row_table is not None and self.plain and q.dtype == torch.bfloat16:
            # short prompt chunks (and the step's decodes) in one call of the decode kernel, every
            # token a row; bf16 only: float32 prompts keep SDPA's sums, which transformers' match
            out = cpu_kernels.paged_decode(q, self.k_cache, self.v_cache, attn.row_table, attn.row_lens, self.scale)
            if out is not None:
                return out.view(q.shape[0], self.num_heads * self.head_dim)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], attn)
        for chunk in attn.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], chunk)
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _gather(self, cache: torch.Tensor, block_ids: torch.Tensor, rows: int) -> torch.Tensor:
        # whole blocks are copied at once: [rows, blocks * block_size, kv_heads, head_dim] → heads first
        g = cache.index_select(0, block_ids)
        return g.view(rows, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def _decode(self, q: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        if self.plain:
            out = cpu_kernels.paged_decode(q, self.k_cache, self.v_cache, attn.decode_block_table,
                                           attn.decode_seq_lens, self.scale)
            if out is not None:
                return out
        d = q.shape[0]
        table = attn.decode_block_table.view(-1)
        keys = self._gather(self.k_cache, table, d)
        values = self._gather(self.v_cache, table, d)
        if not self.plain:
            positions = torch.arange(keys.shape[2], device=q.device)  # [keys]
            query_positions = (attn.decode_seq_lens - 1)[:, None, None, None]  # [decodes, 1, 1, 1]
            o = self._explicit(q.unsqueeze(2), keys, values, attn.decode_mask(), query_positions, positions)
            return o.squeeze(2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=attn.decode_mask(), scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o.squeeze(2)  # [decodes, heads, head_dim]

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk) -> torch.Tensor:
        gqa = self.num_heads != self.num_kv_heads
        q = q.transpose(0, 1).unsqueeze(0)  # [1, heads, length, head_dim]
        if not self.plain:
            total = chunk.context_len + chunk.length
            if chunk.context_len == 0:
                keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            else:
                keys = self._gather(self.k_cache, chunk.block_ids, 1)[:, :, :total]
                values = self._gather(self.v_cache, chunk.block_ids, 1)[:, :, :total]
            positions = torch.arange(total, device=q.device)
            query_positions = (chunk.context_len + torch.arange(chunk.length, device=q.device))[:, None]
            mask = positions[None, :] <= query_positions  # [length, total] causal
            o = self._explicit(q, keys, values, mask, query_positions, positions)
            return o[0].transpose(0, 1)
        if chunk.context_len == 0:
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scale, enable_gqa=gqa)
        else:
            total = chunk.context_len + chunk.length
            keys = self._gather(self.k_cache, chunk.block_ids, 1)[:, :, :total]
            values = self._gather(self.v_cache, chunk.block_ids, 1)[:, :, :total]
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=chunk.mask, scale=self.scale, enable_gqa=gqa)
        return o[0].transpose(0, 1)  # [length, heads, head_dim]

    def _explicit(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Attention with the layer's options. q: [b, heads, queries, d]; keys/values: [b, kv_heads,
        keys, d]; mask: bool, broadcast to [b, heads, queries, keys]; positions broadcast the same way."""
        if self.window is not None:
            mask = mask & (key_positions > query_positions - self.window)
        bias = None
        if self.alibi is not None:  # slope × key position, as BLOOM adds it (softmax ignores the row offset)
            bias = self.alibi[:, None, None] * key_positions.to(torch.float32)  # [heads, 1, keys]
        if self._position_bias:
            relative = self._position_bias[0](query_positions, key_positions)
            bias = relative if bias is None else bias + relative
        if self.softcap is None:
            additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            if bias is not None:
                additive = additive + bias.to(q.dtype)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=additive, scale=self.scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)
        repeat = self.num_heads // self.num_kv_heads
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype)
        return weights @ values
