"""Position encodings: rotary embeddings (with the scaling variants transformers defines, rotating
all or the first part of each head), learned absolute positions, and ALiBi slopes."""

from __future__ import annotations

import math

import torch
from torch import nn

from tgserve import distributed as dist
from tgserve.layers import cpu_kernels
from tgserve.layers.linear import default_weight_loader

# rope types whose frequencies depend on the sequence length at run time are not supported yet
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "proportional"}


def rope_frequencies(hf_config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, exactly as transformers computes them. `head_dim`
    is the rotated width (partial rotary: less than the head); `layer_type` picks one of a model's
    per-layer-type settings (Gemma 3: "sliding_attention" / "full_attention")."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _STATIC_ROPE_TYPES:
        raise NotImplementedError(f"rope type {rope_type!r} is not supported yet")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = (hf_config, None) if layer_type is None else (hf_config, None, None, layer_type)
    return ROPE_INIT_FUNCTIONS[rope_type](*args)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position ("rotate half" layout); cos/sin tables are built once. With
    inv_freq shorter than half a head, only the first 2 × len(inv_freq) dimensions rotate."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.rotary_dim = 2 * inv_freq.shape[0]
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]
        native = cpu_kernels.rotary(q, k, positions, self.cos, self.sin) if self.rotary_dim == q.shape[-1] else None
        if native is not None:
            return native  # the same formula in one pass (layers/kernels/elementwise.c)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        if self.rotary_dim == q.shape[-1]:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        r = self.rotary_dim  # partial rotary: the rest of each head passes through
        q_rot, k_rot = q[..., :r], k[..., :r]
        q_rot = q_rot * cos + _rotate_half(q_rot) * sin
        k_rot = k_rot * cos + _rotate_half(k_rot) * sin
        return torch.cat((q_rot, q[..., r:]), dim=-1), torch.cat((k_rot, k[..., r:]), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LearnedPositions(nn.Module):
    """Absolute position embeddings looked up by position (+ `offset`: OPT keeps 2 unused rows)."""

    def __init__(self, num_positions: int, hidden_size: int, dtype: torch.dtype, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(num_positions + offset, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions + self.offset]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; BLOOM's layout for a head count that is not a power
    of two), computed in float32 powers as transformers computes them, for this rank's heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    heads = dist.head_shard(num_heads)
    return slopes[heads.start:heads.start + heads.count]
