"""The dequantized reference of each --quantize method: float32 x @ dequantize(q(W)).T, with the
activations rounded as the method rounds them before its matmul and the output rounded to the
dtype its kernel writes. The weight side is exactly the method's dequantized weight; what is
left between a method and its reference is the kernels' summation order (float tolerance).

- int8, int4, bitsandbytes-nf4/fp4 on CPU: activations in bf16, output in bf16;
- bitsandbytes (LLM.int8): activations in fp16, each row quantized to int8 by bitsandbytes'
  own `int8_vectorwise_quant` except the outlier columns (> 6.0), which stay fp16; output fp16.

And GPTQ / AWQ checkpoints (--quantize gptq / awq), made by a round-to-nearest quantizer and packed
as the formats are described, independently of tgserve's reader: GPTQ's qweight holds 8 values per
int32 along the inputs (the i-th at bits 4i), its qzeros along the outputs, v1 storing zero points
minus one; AWQ's both along the outputs, nibble i holding column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tgserve import distributed
from tgserve.quant import QuantMethod

METHODS = ["int8", "int4", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"]


def needs_package(method: str) -> None:
    if method.startswith("bitsandbytes"):
        pytest.importorskip("bitsandbytes")


def method_activations(method: str, x: torch.Tensor) -> torch.Tensor:
    """x as the method's matmul sees it, in float32."""
    if method != "bitsandbytes":
        return x.to(torch.bfloat16).float()
    import bitsandbytes.functional as bnbf

    from tgserve.quant.bnb import THRESHOLD

    x16 = x.to(torch.float16)
    ca, sca, outliers = bnbf.int8_vectorwise_quant(x16, threshold=THRESHOLD)
    xq = ca.float() * (sca[:, None] / 127)
    if outliers is not None and outliers.numel():
        xq[:, outliers] = x16[:, outliers].float()
    return xq


def output_dtype(method: str) -> torch.dtype:
    return torch.float16 if method == "bitsandbytes" else torch.bfloat16


def reference_matmul(method: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[..., in] @ weight [out, in].T in float32, rounded like the method's output."""
    y = F.linear(method_activations(method, x.reshape(-1, x.shape[-1])), weight.float())
    return y.to(output_dtype(method)).float().reshape(*x.shape[:-1], -1)


class DequantizedReference(QuantMethod):
    """A linear of the reference model: the quantized layer's dequantized weight, in float32."""

    def __init__(self, method: str, weight: torch.Tensor):
        self.method, self.weight = method, weight

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = reference_matmul(self.method, x, self.weight).to(x.dtype)
        return y if bias is None else y + bias


# ---- GPTQ / AWQ checkpoints ---------------------------------------------------------------------------


def rtn(w: torch.Tensor, group: int, sym: bool, g_idx: torch.Tensor):
    """Round-to-nearest 4-bit of w [out, in] in the groups g_idx gives each input feature:
    (q [out, in], fp16 scales [groups, out], zero points [groups, out]), w ≈ (q - z) * s."""
    groups = int(g_idx.max()) + 1
    s = torch.empty(groups, w.shape[0])
    z = torch.empty(groups, w.shape[0], dtype=torch.long)
    for k in range(groups):
        cols = w[:, g_idx == k]
        if sym:
            s[k], z[k] = 2 * cols.abs().amax(1) / 15, 8
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s[k] = (hi - lo) / 15
            z[k] = torch.round(-lo / s[k].half().float()).clamp(1, 15)  # 1..: v1 stores z - 1
    s = s.half()
    q = torch.round(w / s[g_idx].t().float()) + z[g_idx].t()
    return q.clamp(0, 15).long(), s, z


def dequantized_gptq_awq(q, s, z, g_idx) -> torch.Tensor:
    return (q - z[g_idx].t()).float() * s[g_idx].t().float()


def pack(values: np.ndarray, axis: int, order=range(8)) -> np.ndarray:
    """Eight 4-bit values per int32 along `axis`: the i-th (bits 4i) is value 8c + order[i]."""
    values = np.moveaxis(values.astype(np.uint32), axis, -1)
    words = np.zeros(values.shape[:-1] + (values.shape[-1] // 8,), dtype=np.uint32)
    for i, j in enumerate(order):
        words |= values[..., j::8] << np.uint32(4 * i)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32))


def gptq_awq_tensors(w: torch.Tensor, spec: dict, seed: int):
    """One linear's checkpoint tensors in the format `spec` names (method gptq / awq, group, -1:
    one per row; sym; GPTQ's checkpoint_format, desc_act: g_idx shuffled), the reference
    (q, s, z, g_idx) and the float weight it dequantizes to."""
    inn = w.shape[1]
    group = inn if spec["group"] == -1 else spec["group"]
    g_idx = torch.arange(inn) // group
    if spec.get("desc_act"):
        g_idx = g_idx[torch.randperm(inn, generator=torch.Generator().manual_seed(seed))]
    q, s, z = rtn(w, group, spec["sym"], g_idx)
    if spec["method"] == "awq":  # [in, out/8] along the outputs, AWQ's order
        parts = {"qweight": pack(q.t().numpy(), 1, (0, 2, 4, 6, 1, 3, 5, 7)),
                 "qzeros": pack(z.numpy(), 1, (0, 2, 4, 6, 1, 3, 5, 7)), "scales": s}
    else:  # [in/8, out] along the inputs; zero points along the outputs
        stored = z - 1 if spec["checkpoint_format"] == "gptq" else z
        parts = {"qweight": pack(q.t().numpy(), 0), "qzeros": pack(stored.numpy(), 1), "scales": s,
                 "g_idx": g_idx.to(torch.int32)}
    return parts, (q, s, z, g_idx), dequantized_gptq_awq(q, s, z, g_idx)


def ranks(monkeypatch, build, tp: int = 2) -> list:
    """`build()` as each rank of a tensor-parallel group would (no process group needed to load)."""
    layers = []
    for rank in range(tp):
        monkeypatch.setattr(distributed, "_rank", rank)
        monkeypatch.setattr(distributed, "_world_size", tp)
        layers.append(build())
    monkeypatch.setattr(distributed, "_rank", 0)
    monkeypatch.setattr(distributed, "_world_size", 1)
    return layers
