"""Normalisation layers, computed the way the reference implementations compute them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgserve.layers import cpu_kernels
from tgserve.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """Llama's RMSNorm: statistics in float32, scaled in the input dtype."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self) is RMSNorm and (native := cpu_kernels.rms_norm(x, self.weight, self.eps)) is not None:
            return native  # the same formula in one pass (layers/kernels/elementwise.c)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of it): the residual add before a norm, fused where a native
        kernel takes it (the same bits as the two steps)."""
        if type(self) is RMSNorm and (native := cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)):
            return native
        x = x + residual
        return x, self(x)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 and applied in float32."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__(hidden_size, eps, dtype)
        self.weight.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2, OPT, BLOOM, GPT-NeoX, Phi)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
