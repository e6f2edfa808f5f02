"""What every weight-only method shares: the full-precision rows of a layer are staged while its
checkpoint parts arrive, and quantized the moment the last row is in.

So the full-precision copy of a layer lives only from its first part's load to its last one's
(a fused q/k/v or gate/up layer waits for all its parts): while loading, memory holds the
quantized layers done so far, the unquantized parameters (embeddings, norms, LM head) and the
staging buffers of the few layers whose parts are still arriving, plus fp32 temporaries for the
one layer being quantized. The parameter the loader sees until then is a zero-stride placeholder
of the full shape and dtype, which costs no memory. glibc keeps freed blocks in its heap, where
the next layer's kept tensors fragment it: without giving them back after each layer, SmolLM2's
load peaked at 260-460 MB resident for 185-230 MB kept (it varied run to run); with it, at what
is kept plus one layer (bench/quantize.py's "load MB").

A method stores its quantized tensors as buffers of the layer (so `model.to(device)` moves them)
and can always rebuild the float weight it multiplies by (`dequantize`), which the tests use as
the reference: apply(x) == x @ dequantize().T up to the rounding of the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import weakref

import torch
from torch import nn

from tgserve.quant.base import QuantMethod

log = logging.getLogger(__name__)

# the CPU kernels measured fast (libraries.md §4): bf16 activations; fp32 or fp16 ones are 10-30x slower
CPU_ACTIVATION_DTYPE = torch.bfloat16


class WeightOnly(QuantMethod):
    """Staging and the layer's life cycle; subclasses say how to quantize, dequantize and apply."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        placeholder = torch.zeros((), dtype=dtype).expand(out_features, in_features)
        layer.weight = nn.Parameter(placeholder, requires_grad=False)
        self.dtype = dtype
        self._layer = weakref.ref(layer)  # the layer owns this method: no reference cycle
        self._staged: torch.Tensor | None = None
        self._rows = 0
        self.quantized = False

    def load(self, param: nn.Parameter, shard: torch.Tensor, out_offset: int | None = None) -> None:
        if self.quantized:
            raise ValueError("this layer is already quantized: a part of its weight was loaded twice")
        if self._staged is None:
            self._staged = torch.zeros(param.shape, dtype=param.dtype)
        target = self._staged if out_offset is None else self._staged.narrow(0, out_offset, shard.shape[0])
        if target.shape != shard.shape:
            raise ValueError(f"shape mismatch: parameter {tuple(target.shape)} vs checkpoint {tuple(shard.shape)}")
        target.copy_(shard)
        self._rows += shard.shape[0]
        if self._rows >= param.shape[0]:
            self._quantize_staged()

    def after_load(self, layer: nn.Module) -> None:
        if not self.quantized:  # only a layer built and loaded by hand gets here with rows missing
            self._quantize_staged()
        del layer.weight  # the placeholder: the quantized buffers are what the matmul reads
        layer.weight = None

    def _quantize_staged(self) -> None:
        layer = self._layer()
        staged = self._staged if self._staged is not None else torch.zeros(layer.weight.shape, dtype=self.dtype)
        with torch.no_grad():
            self.quantize(layer, staged)
        self._staged, self.quantized = None, True
        del staged
        _return_freed_memory()

    # ---- what a method defines --------------------------------------------------------------

    def quantize(self, layer: nn.Module, weight: torch.Tensor) -> None:
        """Register the quantized form of `weight` ([out, in], the model dtype) on `layer`."""
        raise NotImplementedError

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The float32 [out, in] weight the method multiplies by, rebuilt from what it stores."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """[..., in] → contiguous [tokens, in]: the kernels take 2-D activations, rows `in` apart."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Kernel output [tokens, out] back to x's leading shape and dtype, plus the bias."""
    y = y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    return y if bias is None else y + bias


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to give back this way
        return None


def _return_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
