"""--quantize int8: weight-only, per-output-channel symmetric int8 (gpt-fast's and torchao's scheme).

Stored: `qweight` int8 [out, in] and `scales` bf16 [out]; w ≈ qweight * scales. The rows are
rounded against the bf16 scale the kernel multiplies by, so the dequantized weight is exactly
what the matmul uses.

On CPU, few rows (decode) go through `torch._weight_int8pack_mm` with bf16 activations (fp32 or
fp16 ones run 10-30x slower: libraries.md §4; an fp32 model's activations are cast to bf16 and its
outputs back). Its AVX-512 loop reads 16 input features at a time with aligned loads, so the
activations go in contiguous and 32-byte aligned, and a layer whose input is no multiple of 16
never takes it. Its time grows with every row, while a bf16 GEMM on the int8 weight converted to
bf16 pays the conversion once: from `DEQUANT_ROWS` rows on (prefill, large batches) the latter is
faster (SmolLM2's 1536x576 layers: 16 rows 194 vs 197 µs, 64 rows 762 vs 384 µs; a 4096x4096
layer, past the caches, gains only from ~128 rows, hence a threshold growing with the layer).
Off CPU (untested: no GPU here) the dequantize-then-matmul path serves every call, in the
activations' dtype: correct, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgserve.quant.weight_only import CPU_ACTIVATION_DTYPE, WeightOnly, finish, rows_of

DEQUANT_ROWS = 24  # for layers up to 2M weights; bigger ones need proportionally more rows


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float → (int8 [out, in], bf16 scales [out])."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8WeightOnly(WeightOnly):
    def quantize(self, layer: nn.Module, weight: torch.Tensor) -> None:
        q, scales = quantize_int8(weight)
        layer.register_buffer("qweight", q, persistent=False)
        layer.register_buffer("scales", scales, persistent=False)
        out, inn = q.shape
        # the kernel reads 16 input features at a time, rows aligned: other widths read past them
        self.kernel_rows = DEQUANT_ROWS * max(1, out * inn // 2**21) if inn % 16 == 0 else None

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.qweight.float() * layer.scales.float()[:, None]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = rows_of(x)
        if x.device.type == "cpu":
            xb = x2.to(CPU_ACTIVATION_DTYPE)
            if self.kernel_rows is not None and x2.shape[0] < self.kernel_rows:
                if xb.data_ptr() % 32:  # the AVX-512 kernel's aligned loads would fault
                    xb = xb.clone()
                y = torch._weight_int8pack_mm(xb, layer.qweight, layer.scales)
            else:
                y = F.linear(xb, layer.qweight.to(xb.dtype)) * layer.scales
        else:
            y = F.linear(x2, layer.qweight.to(x.dtype)) * layer.scales.to(x.dtype)
        return finish(y, x, bias)
