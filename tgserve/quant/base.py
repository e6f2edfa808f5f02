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

from tgserve.layers import cpu_kernels

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

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of a fused [gate | up] layer (no bias), computed with its matmul where
        the method has a kernel for that; None: the caller applies the layer, then the activation."""
        return None


class Unquantized(QuantMethod):
    """Plain weights in the model dtype. On CPU the weight is repacked once: bf16 weights on a CPU
    with AVX-512 BF16 (or AVX2 and FMA: the GEMM's AVX2 build) into panels for the native GEMM
    (layers/kernels/gemm_panel.c), which every batch size runs — ~410 GFLOP/s at 64 rows where
    oneDNN ran 260-385, and at one to four rows it streams the weights faster than the row-major
    small-batch kernel (SmolLM2's layers: 44 vs 41 GB/s at one row, 44 vs 27-29 at two to four);
    other weights into oneDNN's blocked layout, which runs the skinny matmuls of decoding 1.3-2x
    faster than the plain GEMM here.

    A bf16 weight without panels (a shape the GEMM does not take: outputs not a multiple of 64,
    e.g. GPT-2's 50257-word LM head) runs one to four rows on the small-batch kernel
    (layers/kernels/linear_small.c: ~27 GB/s where oneDNN reads ~16.5), and so does a float32
    weight (~30 GB/s where oneDNN's packed one reads ~22), when it keeps its plain weight too:
    always for a weight another module owns anyway (a tied LM head), and for the others when the
    model's linears take little of the memory (`keep_plain`, set by the loader: see
    `plain_copies_fit`)."""

    keep_plain = False  # keep the plain weight beside the packed one (the loader's memory policy)
    shared = False  # the weight belongs to another module too (a tied LM head): keeping it costs nothing

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)

    def load(self, param: nn.Parameter, shard: torch.Tensor, out_offset: int | None = None) -> None:
        target = param.data if out_offset is None else param.data.narrow(0, out_offset, shard.shape[0])
        if target.shape != shard.shape:
            raise ValueError(f"shape mismatch: parameter {tuple(target.shape)} vs checkpoint {tuple(shard.shape)}")
        target.copy_(shard)

    def after_load(self, layer: nn.Module) -> None:
        # bf16 on a CPU with AVX-512 BF16 or AVX2: panels for the native GEMM (layers/kernels/gemm_panel.c,
        # the fastest here at every batch size); otherwise oneDNN's packed copy
        layer.panel_weight = cpu_kernels.panel_pack(layer.weight)
        layer.packed_weight = _onednn_pack(layer.weight) if layer.panel_weight is None else None
        layer.small_weight = None
        if layer.packed_weight is not None or layer.panel_weight is not None:
            if layer.panel_weight is None and (self.keep_plain or self.shared) \
                    and cpu_kernels.linear_small_rows(layer.weight.dtype):
                layer.small_weight = layer.weight.detach()
            # the packed copy is what the larger matmuls read: keeping the plain one as well
            # doubles the weights' memory unless it is kept above (a tied LM head's tensor lives
            # on in the embedding that owns it)
            del layer.weight
            layer.weight = None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        panels = getattr(layer, "panel_weight", None)
        if panels is not None:
            return cpu_kernels.gemm_panel(x, panels, bias)
        small = getattr(layer, "small_weight", None)
        if small is not None and x.dim() == 2:
            y = cpu_kernels.linear_small(x, small, bias)
            if y is not None:
                return y
        packed = getattr(layer, "packed_weight", None)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, layer.weight, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        # where `apply` runs the panel GEMM, the GEMM that fuses the SiLU (gemm_panel.c)
        panels = getattr(layer, "panel_weight", None)
        return cpu_kernels.gemm_panel_silu(x, panels) if panels is not None else None


# the plain weights of a model's linears are kept beside the packed ones when they take at most
# this share of the memory available at load (SmolLM2: 214 MB of 24 GB)
PLAIN_COPY_SHARE = 0.05


def plain_copies_fit(linear_bytes: int, available_bytes: int) -> bool:
    return linear_bytes <= PLAIN_COPY_SHARE * available_bytes


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN-packed copy of a CPU weight, or None where oneDNN cannot take it (then F.linear runs)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_HINT_ROWS)
    except (RuntimeError, AttributeError) as e:  # e.g. bf16 without AVX-512
        log.debug("oneDNN packing unavailable (%s); using F.linear", e)
        return None
