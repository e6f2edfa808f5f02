"""The plug point for quantization: a method object owned by each linear layer.

Four moments of a layer's life: create its parameters, load a (full-precision, already sharded)
tensor into them, post-process after loading (quantize or repack), and apply the matmul.
Tensor parallelism happens before `load` sees a tensor, so the two never need to know each other.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# batch-size hint for oneDNN's weight layout; decode batches on CPU are around this size
_PACK_HINT_ROWS = 32


class QuantMethod:
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def load(self, param: nn.Parameter, shard: torch.Tensor, out_offset: int | None = None) -> None:
        """Copy a rank-local tensor into `param` (at row `out_offset` for fused parameters)."""
        raise NotImplementedError

    def after_load(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class Unquantized(QuantMethod):
    """Plain weights in the model dtype. On CPU the weight is repacked once into oneDNN's blocked
    layout, which runs the skinny matmuls of decoding 1.3-2x faster than the plain GEMM here."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def load(self, param: nn.Parameter, shard: torch.Tensor, out_offset: int | None = None) -> None:
        target = param.data if out_offset is None else param.data.narrow(0, out_offset, shard.shape[0])
        if target.shape != shard.shape:
            raise ValueError(f"shape mismatch: parameter {tuple(target.shape)} vs checkpoint {tuple(shard.shape)}")
        target.copy_(shard)

    def after_load(self, layer: nn.Module) -> None:
        layer.packed_weight = _onednn_pack(layer.weight)
        if layer.packed_weight is not None:
            # the packed copy is the only one the matmul reads: keeping both would double the
            # weights' memory (a tied LM head's tensor lives on in the embedding that owns it)
            del layer.weight
            layer.weight = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed = getattr(layer, "packed_weight", None)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, layer.weight, bias)


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN-packed copy of a CPU weight, or None where oneDNN cannot take it (then F.linear runs)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_HINT_ROWS)
    except (RuntimeError, AttributeError) as e:  # e.g. bf16 without AVX-512
        log.debug("oneDNN packing unavailable (%s); using F.linear", e)
        return None
