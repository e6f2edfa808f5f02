"""Activation functions by their Hugging Face config names, and the gated forms over fused projections.

Each is written the way its reference model computes it (the tanh approximations differ in the
last bits between a fused kernel and the written-out formula, and greedy decoding can notice).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tgserve.layers import cpu_kernels


def _gelu_new(x: torch.Tensor) -> torch.Tensor:  # GPT-2's tanh approximation, written out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:  # BLOOM's own constant
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new, "gelu_fast": _gelu_fast, "bloom_gelu": _bloom_gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the fused [gate | up] projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (native := cpu_kernels.silu_mul(x)) is not None:
            return native  # the same formula in one pass (layers/kernels/elementwise.c)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ActAndMul(nn.Module):
    """act(gate) * up over a fused [gate | up] projection, for any activation (Gemma: gelu tanh)."""

    def __init__(self, name: str):
        super().__init__()
        self.act = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
