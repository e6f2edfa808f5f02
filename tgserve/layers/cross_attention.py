"""Cross-attention of an encoder-decoder model over paged blocks.

The encoder runs once per request, in the step that admits it; each decoder layer's K/V of the
encoder output are written into the request's own cross blocks — in that layer's self-attention
cache tensors (the blocks come from the same pool, so no memory is set aside for them) — and every
later decoder step attends to them like a decode over a sequence of the encoder's length: all of it
visible, nothing causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tgserve.layers import cpu_kernels
from tgserve.layers.attention import AttentionInputs, PagedAttention


@dataclass(frozen=True, slots=True)
class EncoderBatch:
    """The encoder inputs of the sequences admitted this step, flat."""

    input_ids: torch.Tensor  # [encoder tokens]
    lengths: list[int]  # per sequence, in order
    slot_mapping: torch.Tensor  # [encoder tokens] cross-block slot of each token's K/V


@dataclass(frozen=True, slots=True)
class CrossInputs:
    """What cross-attention reads in one step (shared by all decoder layers)."""

    decode_block_table: torch.Tensor | None  # [num_decode, max_blocks] the decode rows' cross blocks
    decode_lens: torch.Tensor | None  # [num_decode] encoder length of each decode row
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_blocks * block_size] True = a real key
    chunks: tuple[tuple[torch.Tensor, int], ...]  # (cross blocks, encoder length) per prefill chunk
    encode: EncoderBatch | None


class PagedCrossAttention(nn.Module):
    """Queries of the decoder over the encoder's K/V, stored in `cache_of`'s cache tensors."""

    def __init__(self, cache_of: PagedAttention, scale: float):
        super().__init__()
        self.cache_of, self.scale = cache_of, scale

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v: [encoder tokens, kv_heads, head_dim] into their cross slots."""
        a = self.cache_of
        num_blocks, block_size = a.k_cache.shape[:2]
        a.k_cache.view(num_blocks * block_size, a.num_kv_heads, a.head_dim).index_copy_(0, slot_mapping, k)
        a.v_cache.view(num_blocks * block_size, a.num_kv_heads, a.head_dim).index_copy_(0, slot_mapping, v)

    def forward(self, q: torch.Tensor, attn: AttentionInputs, cross: CrossInputs) -> torch.Tensor:
        # q: [tokens, heads, head_dim] in the flat order of the step → [tokens, heads * head_dim]
        a = self.cache_of
        out = torch.empty_like(q)
        d = attn.num_decode
        if d:
            decoded = cpu_kernels.paged_decode(q[:d], a.k_cache, a.v_cache, cross.decode_block_table,
                                               cross.decode_lens, self.scale)
            if decoded is None:
                table = cross.decode_block_table.view(-1)
                keys, values = a._gather(a.k_cache, table, d), a._gather(a.v_cache, table, d)
                decoded = F.scaled_dot_product_attention(
                    q[:d].unsqueeze(2), keys, values, attn_mask=cross.decode_mask, scale=self.scale,
                    enable_gqa=a.num_heads != a.num_kv_heads).squeeze(2)
            out[:d] = decoded
        for chunk, (blocks, length) in zip(attn.prefills, cross.chunks):
            rows = slice(chunk.start, chunk.start + chunk.length)
            keys = a._gather(a.k_cache, blocks, 1)[:, :, :length]
            values = a._gather(a.v_cache, blocks, 1)[:, :, :length]
            o = F.scaled_dot_product_attention(q[rows].transpose(0, 1).unsqueeze(0), keys, values, scale=self.scale,
                                               enable_gqa=a.num_heads != a.num_kv_heads)
            out[rows] = o[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)
