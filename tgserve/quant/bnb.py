"""--quantize bitsandbytes (LLM.int8), bitsandbytes-nf4, bitsandbytes-fp4: bitsandbytes' own
quantizers and matmuls, called as functions on tensors this layer owns (TGI's methods, by name).

bitsandbytes is imported when one of these methods is asked for, never otherwise; without it the
first layer's create_weights says how to install it, before any weight is read.

- LLM.int8: `F.int8_vectorwise_quant` of the weight in fp16 gives int8 rows `CB` and their absmax
  `SCB` (w ≈ CB * SCB / 127). `bnb.matmul` quantizes each activation row to int8 too, except the
  input features above the outlier threshold (6.0, as TGI), which multiply the dequantized weight
  columns in fp16. Activations go in as fp16 (bitsandbytes casts them anyway) and come back in the
  model dtype. The tests' reference is therefore looser here: the weight side is exact, the
  activation side carries int8 rounding.
- NF4 / FP4: `F.quantize_4bit`, blocks of 64 weights along each row (32 where the row is no
  multiple of 64: bitsandbytes 0.50's CPU dequantizer counts blocks per row while its quantizer
  counts them over the flattened weight, so a block must not straddle rows; a row no multiple of
  32 is refused), fp32 absmax per block (no double quantization: the CPU kernel reads plain absmax). On a CPU with AVX-512 BF16 the first
  CPU call repacks the weight into bitsandbytes' CPU layout (what `bnb.nn.Linear4bit` does) and
  `F.gemv_4bit` runs its fused bf16 kernel at any batch; elsewhere `bnb.matmul_4bit` runs
  (CUDA's kernels: untested, no GPU here).
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve.quant.weight_only import WeightOnly, finish, rows_of

THRESHOLD = 6.0  # LLM.int8's outlier threshold, TGI's value
BLOCKSIZES = (64, 32)  # the first that divides a layer's input features
CPU_PACK_ROWS = 32  # bitsandbytes' CPU layout packs the output rows in blocks of 32


def import_bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as e:
        raise ImportError("--quantize bitsandbytes* needs the bitsandbytes package "
                          "(pip install 'bitsandbytes==0.50.2')") from e
    return bitsandbytes


class BitsAndBytesInt8(WeightOnly):
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        self.bnb = import_bnb()
        super().create_weights(layer, in_features, out_features, dtype)

    def quantize(self, layer: nn.Module, weight: torch.Tensor) -> None:
        cb, scb, _ = self.bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.register_buffer("CB", cb, persistent=False)
        layer.register_buffer("SCB", scb, persistent=False)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.CB.float() * (layer.SCB.float()[:, None] / 127)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        state = self.bnb.MatmulLtState()
        state.CB, state.SCB = layer.CB, layer.SCB
        state.threshold, state.has_fp16_weights, state.is_training = THRESHOLD, False, False
        y = self.bnb.matmul(rows_of(x).to(torch.float16), layer.CB, state=state)
        return finish(y, x, bias)


class BitsAndBytes4bit(WeightOnly):
    quant_type = "nf4"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        self.bnb = import_bnb()
        super().create_weights(layer, in_features, out_features, dtype)

    def quantize(self, layer: nn.Module, weight: torch.Tensor) -> None:
        F = self.bnb.functional
        out, inn = weight.shape
        self.blocksize = next((b for b in BLOCKSIZES if inn % b == 0), None)
        if self.blocksize is None:
            raise ValueError(f"bitsandbytes 4-bit needs input features in multiples of 32, this layer has {inn}")
        qweight, state = F.quantize_4bit(weight, blocksize=self.blocksize, quant_type=self.quant_type,
                                         compress_statistics=False)
        layer.register_buffer("qweight", qweight, persistent=False)
        layer.register_buffer("absmax", state.absmax, persistent=False)
        self.state = state
        self.cpu_packable = out % CPU_PACK_ROWS == 0 and F.has_avx512bf16()
        self.cpu_packed = False

    def _pack_for_cpu(self, layer: nn.Module) -> None:
        """bitsandbytes' CPU layout: [out, in/2] bytes, bf16 absmax [in/block, out]."""
        self.state.absmax = layer.absmax
        packed, self.state = self.bnb.functional._convert_weight_packed_for_cpu(layer.qweight, self.state)
        layer.qweight, layer.absmax = packed, self.state.absmax
        self.cpu_packed = True

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        out, inn = self.state.shape
        code = self.state.code.float().to(layer.qweight.device)
        if self.cpu_packed:  # bytes of 64 values: 32 rows' low nibbles, then the same rows' high ones
            b = layer.qweight.reshape(-1, CPU_PACK_ROWS)
            q = torch.cat([b & 15, b >> 4], dim=-1).reshape(out // CPU_PACK_ROWS, inn // 2, CPU_PACK_ROWS, 2)
            q = q.transpose(1, 2).reshape(out, inn)
            absmax = layer.absmax.float().t()  # [out, in/block]
            w = code[q.long()].reshape(out, inn // self.blocksize, self.blocksize) * absmax[..., None]
            return w.reshape(out, inn)
        self.state.absmax = layer.absmax
        return self.bnb.functional.dequantize_4bit(layer.qweight, self.state).float()

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = rows_of(x)
        if x.device.type == "cpu" and self.cpu_packable:
            if not self.cpu_packed:
                self._pack_for_cpu(layer)
            self.state.absmax = layer.absmax
            y = self.bnb.functional.gemv_4bit(x2.to(torch.bfloat16), layer.qweight, state=self.state)
        else:
            self.state.absmax = layer.absmax  # the buffer follows the model to its device
            self.state.code = self.state.code.to(x.device)
            y = self.bnb.matmul_4bit(x2, layer.qweight.t(), quant_state=self.state)
        return finish(y, x, bias)


class BitsAndBytesFP4(BitsAndBytes4bit):
    quant_type = "fp4"
