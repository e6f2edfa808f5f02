"""--quantize int4: weight-only, groupwise asymmetric int4 (gpt-fast's / tinygemm's scheme).

Each run of 32 input features of an output row has a bf16 scale and zero:
w ≈ (q - 8) * scale + zero, q in 0..15. Stored: `qweight`, the uint8 [out, in/2] that
`torch._convert_weight_to_int4pack_for_cpu` packs, and `scales_zeros` bf16 [in/32, out, 2], the
layout `torch._weight_int4pack_mm_for_cpu` reads (0.625 bytes per weight in all). Groups of 32
rather than 64 or 128: the kernel runs equally fast with any (1536x576 at 1 / 8 / 32 rows:
28 / 87 / 335 µs with 32, 27 / 86 / 329 µs with 64), the error is smaller, and a checkpoint that
came from a GGUF Q4_0/Q4_1 file (SmolLM2 here) keeps its own 32-weight grid: perplexity 19.12
against bf16's 19.00, where groups of 64 give 27.1. A layer the kernel cannot take (input no
multiple of 32, output no multiple of 16) is quantized to int8 instead, with a warning. A GPTQ / AWQ
checkpoint's own grid is stored as it is (`load_grid`, from quant/prequantized.py), in its own
groups of 32 to 256.

The packed layout is the CPU kernel's (it depends on the vector width torch dispatched to);
`unpack` rebuilds the int4 values from it, for the tests' reference and off CPU. The tinygemm
kernel's time grows with every row: from `dequant_rows` rows on (prefill), one bf16 GEMM over the
weight dequantized straight into its transposed layout is faster (SmolLM2's 1536x576: 1.0 vs
0.86 ms at 96 rows, 2.7 vs 1.5 ms at 256; a 4096x4096 layer, past the caches, gains only from
~768 rows). Off CPU (untested:
no GPU here) every call dequantizes; CUDA's own `_weight_int4pack_mm` needs the CUDA packing,
which is not wired.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgserve.quant.int8 import Int8WeightOnly
from tgserve.quant.weight_only import CPU_ACTIVATION_DTYPE, WeightOnly, finish, rows_of, warn_once

DEQUANT_ROWS = 96  # for layers up to 2M weights; bigger ones need proportionally more rows
GROUP_SIZE = 32
KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes torch._weight_int4pack_mm_for_cpu accepts


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float → (int32 values 0..15 [out, in], bf16 scales_zeros [in/group, out, 2])."""
    out, inn = weight.shape
    w = weight.float().reshape(out, inn // group, group)
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    # rounded against the bf16 scale and zero the kernel uses: dequantize() is then exact
    q = torch.round((w - (zeros.float() - 8 * scales.float())) / scales.float()).clamp_(0, 15)
    scales_zeros = torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [in/group, out, 2]
    return q.to(torch.int32).reshape(out, inn), scales_zeros


def _block_n() -> tuple[int, bool]:
    """(output rows per packed block, whether a full block splits its rows in halves), for the
    vector width the CPU int4 kernels run at (torch's int4mm_kernel.cpp)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return 64, True
    if capability == "AVX2":
        return 32, True
    return 32, False


def unpack(packed: torch.Tensor, out: int, inn: int) -> torch.Tensor:
    """The CPU kernel's packed uint8 → int values 0..15 [out, in]. Per block of output rows, the
    bytes run over the input features; a byte holds rows j and j + block/2 of a full block
    (vectorised kernels), rows 2j and 2j + 1 otherwise."""
    block, halves = _block_n()
    flat = packed.reshape(-1)
    full = (out // block) * block
    parts = []
    if full:
        b = flat[: full * inn // 2].reshape(full // block, inn, block // 2)
        lo, hi = b & 15, b >> 4
        rows = torch.cat([lo, hi], dim=-1) if halves else torch.stack([lo, hi], dim=-1).flatten(-2)
        parts.append(rows.transpose(1, 2).reshape(full, inn))
    if out > full:
        b = flat[full * inn // 2:].reshape(inn, (out - full) // 2)
        parts.append(torch.stack([b & 15, b >> 4], dim=-1).flatten(-2).t())
    return torch.cat(parts).to(torch.int32) if len(parts) > 1 else parts[0].to(torch.int32)


def dequantize_transposed(packed: torch.Tensor, scales_zeros: torch.Tensor, out: int, inn: int,
                           group: int) -> torch.Tensor:
    """The bf16 weight transposed, [in, out], written in one pass per nibble straight from the
    packed layout of full vectorised blocks (`unpack`'s first case), scales in their stored order."""
    block, _ = _block_n()
    blocks, groups = out // block, inn // group
    b = packed.reshape(blocks, inn, block // 2)
    values = torch.cat([b & 15, b >> 4], dim=-1).view(blocks, groups, group, block)
    wt = torch.empty(inn, out, dtype=torch.bfloat16, device=packed.device)
    target = wt.view(groups, group, blocks, block).permute(2, 0, 1, 3)  # = values' layout
    scales = scales_zeros[..., 0].contiguous()  # [in/group, out]
    mins = scales_zeros[..., 1] - 8 * scales
    scales, mins = (t.view(groups, 1, blocks, block).permute(2, 0, 1, 3) for t in (scales, mins))
    torch.mul(values, scales, out=target)
    target.add_(mins)
    return wt


def dequantize_int4(q: torch.Tensor, scales_zeros: torch.Tensor, group: int, dtype=torch.float32) -> torch.Tensor:
    out, inn = q.shape
    sz = scales_zeros.to(dtype).transpose(0, 1)  # [out, in/group, 2]
    w = (q.reshape(out, inn // group, group).to(dtype) - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(out, inn)


def fits_kernel(out: int, inn: int) -> bool:
    """Whether the int4 kernel takes an [out, in] layer (with groups of 32 at least)."""
    return inn % GROUP_SIZE == 0 and out % 16 == 0


class Int4WeightOnly(WeightOnly):
    def quantize(self, layer: nn.Module, weight: torch.Tensor) -> None:
        out, inn = weight.shape
        self.group, self.fallback = GROUP_SIZE, None
        if not fits_kernel(out, inn):
            warn_once(f"int4-{out}x{inn}", f"int4: a {out}x{inn} layer does not fit the int4 kernel "
                      "(input features a multiple of 32, outputs of 16); it is quantized to int8")
            self.fallback = Int8WeightOnly()
            self.fallback.quantize(layer, weight)
            return
        self.load_grid(layer, *quantize_int4(weight, GROUP_SIZE), GROUP_SIZE)

    def load_grid(self, layer: nn.Module, q: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> None:
        """Store a grid made elsewhere (a GPTQ / AWQ checkpoint's own: quant/prequantized.py):
        q int 0..15 [out, in], bf16 `scales_zeros` [in/group, out, 2], any group the kernel takes."""
        out, inn = q.shape
        if group not in KERNEL_GROUPS or inn % group or not fits_kernel(out, inn):
            raise ValueError(f"int4: the kernel cannot take a {out}x{inn} layer in groups of {group} "
                             f"(groups of {', '.join(map(str, KERNEL_GROUPS))} input features, outputs a multiple of 16)")
        if scales_zeros.shape != (inn // group, out, 2) or scales_zeros.dtype != torch.bfloat16:
            raise ValueError(f"int4: scales_zeros {scales_zeros.dtype} {tuple(scales_zeros.shape)} for a {out}x{inn} "
                             f"layer in groups of {group}; expected bfloat16 {(inn // group, out, 2)}")
        self.group, self.fallback = group, None
        layer.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2),
                              persistent=False)
        layer.register_buffer("scales_zeros", scales_zeros.contiguous(), persistent=False)
        self.shape = (out, inn)
        block, halves = _block_n()
        fast_dequant = halves and out % block == 0
        self.dequant_rows = DEQUANT_ROWS * max(1, out * inn // 2**21) if fast_dequant else None

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback.dequantize(layer)
        return dequantize_int4(unpack(layer.qweight, *self.shape), layer.scales_zeros, self.group)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback.apply(layer, x, bias)
        x2 = rows_of(x)
        if x.device.type == "cpu":
            xb = x2.to(CPU_ACTIVATION_DTYPE)
            if self.dequant_rows is None or x2.shape[0] < self.dequant_rows:
                y = torch._weight_int4pack_mm_for_cpu(xb, layer.qweight, self.group, layer.scales_zeros)
            else:
                y = xb @ dequantize_transposed(layer.qweight, layer.scales_zeros, *self.shape, self.group)
        else:
            warn_once("int4-device", f"int4 on {x.device.type}: no packed kernel wired there; every call "
                      "dequantizes the weight (correct, slow)")
            w = dequantize_int4(unpack(layer.qweight, *self.shape), layer.scales_zeros, self.group, x.dtype)
            y = F.linear(x2, w)
        return finish(y, x, bias)
