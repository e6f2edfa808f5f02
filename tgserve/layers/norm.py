"""Normalisation layers, computed the way the reference implementations compute them."""

from __future__ import annotations

import torch
from torch import nn

from tgserve.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """Llama's RMSNorm: statistics in float32, scaled in the input dtype."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
