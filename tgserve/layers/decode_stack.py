"""A Llama-family decoder's layers in one native call for decode steps (layers/kernels/decode_stack.c):
bf16 on CPUs with AVX-512 BF16 (or AVX2, where every linear has panels), the same kernels and
rounding as the layer-by-layer path, so the same bits, without ~40 Python-level ops per layer — at
one to four rows those cost as much as streaming the weights. The linears run the panel GEMM (up
to MAX_ROWS rows); a linear without panels, the small-batch kernel on its plain weight (up to four
rows). A step whose prompt chunks are all short runs here too: every token is a row of the decode
kernel over its sequence's keys up to its own position (engine/inputs.py's row table), as the
layers' attention runs such a step.

`DecodeStack.run` returns None whenever the step or the model is not one it takes (a longer
prompt chunk in the step, more rows than it takes, another dtype or device, quantized
or sharded linears (any linear whose method is not the plain one), mixture-of-experts MLPs,
biases, q/k norms, partial rotary, attention options, a linear with neither panels nor a plain
weight kept);
the model then runs its layers as usual. In the steps it takes, attention is timed as part of the
forward pass (the step profile's "attention" reads 0 there).
"""

from __future__ import annotations

import torch

from tgserve import distributed as dist
from tgserve.layers import cpu_kernels
from tgserve.layers.activation import SiluAndMul
from tgserve.layers.attention import AttentionInputs
from tgserve.layers.norm import RMSNorm
from tgserve.quant.base import Unquantized


# the most rows a step may have to run here (with panels): its scratch is a few rows x the layer widths
MAX_ROWS = 256


class DecodeStack:
    def __init__(self, layers):
        self.layers = layers  # LlamaDecoderLayers (models/llama.py), loaded
        self.pointers: torch.Tensor | None = None  # [layers * 12] int64, built on first use
        self.cache_ptr = 0  # the first layer's key cache when the pointers were built
        self.usable = self._usable()
        self.max_rows = self._max_rows() if self.usable else 0

    def _usable(self) -> bool:
        # a native linear for every weight: the panel GEMM (AVX-512 BF16 or AVX2) or the small-batch kernel
        if dist.tp_size() != 1 or not (cpu_kernels.gemm_panel_available() or cpu_kernels.linear_small_rows()) \
                or not self.layers:
            return False
        for layer in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if not hasattr(mlp, "gate_up_proj"):  # a mixture of experts (models/moe.py)
                return False
            linears = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if (attention.qk_norm or not attention.attn.plain or type(mlp.act) is not SiluAndMul
                    or attention.rotary.rotary_dim != attention.head_dim
                    or any(type(n) is not RMSNorm or n.weight.dtype != torch.bfloat16
                           for n in (layer.input_layernorm, layer.post_attention_layernorm))
                    or any(type(lin.quant) is not Unquantized or lin.bias is not None
                           or (getattr(lin, "panel_weight", None) is None
                               and getattr(lin, "small_weight", None) is None) for lin in linears)):
                return False
        first = self.layers[0].self_attn
        return first.rotary.cos.dtype == torch.bfloat16 and first.rotary.cos.device.type == "cpu"

    def _max_rows(self) -> int:
        """A linear without panels runs the small-batch kernel: up to its rows only."""
        small = cpu_kernels.linear_small_rows()
        for layer in self.layers:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if any(getattr(lin, "panel_weight", None) is None for lin in linears):
                return small
        return MAX_ROWS

    def _pointer_table(self) -> torch.Tensor:
        def ptr(linear, name: str) -> int:
            t = getattr(linear, name, None)
            return t.data_ptr() if t is not None else 0

        ptrs = []
        for layer in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            linears = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
            qkv, o, gate_up, down = (ptr(lin, "small_weight") for lin in linears)
            ptrs += [layer.input_layernorm.weight.data_ptr(), qkv, o, layer.post_attention_layernorm.weight.data_ptr(),
                     gate_up, down, attention.attn.k_cache.data_ptr(), attention.attn.v_cache.data_ptr(),
                     *(ptr(lin, "panel_weight") for lin in linears)]
        return torch.tensor(ptrs, dtype=torch.int64)

    def run(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor | None:
        """x [rows, hidden] after the embedding → after the last layer (before the final norm)."""
        rows = x.shape[0]
        if (not self.usable or x.dtype != torch.bfloat16 or x.device.type != "cpu"
                or not 0 < rows <= self.max_rows):
            return None
        if attn.row_table is not None:  # short prompt chunks too: every token a row (engine/inputs.py)
            table, lens = attn.row_table, attn.row_lens
        elif not attn.prefills and attn.num_decode == rows:
            table, lens = attn.decode_block_table, attn.decode_seq_lens
        else:
            return None
        first = self.layers[0].self_attn
        if self.pointers is None or self.cache_ptr != first.attn.k_cache.data_ptr():  # caches (re)bound
            self.pointers, self.cache_ptr = self._pointer_table(), first.attn.k_cache.data_ptr()
        mlp = self.layers[0].mlp
        out = x.contiguous()  # the embedding's output: updated in place
        ok = cpu_kernels.decode_stack(
            self.pointers, len(self.layers), out, first.num_heads, first.num_kv_heads, first.head_dim,
            mlp.down_proj.in_features, self.layers[0].input_layernorm.eps, positions, first.rotary.cos,
            first.rotary.sin, attn.slot_mapping, table, lens, first.attn.k_cache.shape[1], first.attn.scale)
        return out if ok else None
