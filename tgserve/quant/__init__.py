"""Quantization methods: each linear layer owns one; `quantize_linears` gives a model's linears the
method `--quantize` names, after the model is built and before its weights load."""

from __future__ import annotations

import importlib

from torch import nn

from tgserve.quant.base import QuantMethod, Unquantized

# --quantize value → (module under tgserve.quant, class); imported when asked for
METHODS: dict[str, tuple[str, str]] = {
    "int8": ("int8", "Int8WeightOnly"),
    "int4": ("int4", "Int4WeightOnly"),
    "bitsandbytes": ("bnb", "BitsAndBytesInt8"),
    "bitsandbytes-nf4": ("bnb", "BitsAndBytes4bit"),
    "bitsandbytes-fp4": ("bnb", "BitsAndBytesFP4"),
    # checkpoints shipped int4-quantized: their own grid, served by int4's kernel
    "gptq": ("prequantized", "PrequantizedInt4"),
    "awq": ("prequantized", "PrequantizedInt4"),
}


def quant_method(name: str) -> QuantMethod:
    if name not in METHODS:
        raise NotImplementedError(f"--quantize {name} is not supported yet; supported: {sorted(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(f"tgserve.quant.{module}"), cls)()


def quantize_linears(model: nn.Module, name: str) -> None:
    """Every tensor-parallel linear of `model` takes the method (the LM head and embeddings keep
    their weights: it is the linears' bytes that bound decoding)."""
    from tgserve.layers.linear import LinearBase

    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant = quant_method(name)
            module.quant.create_weights(module, module.in_features, module.out_features, module.dtype)
            module.weight.weight_loader = module.weight_loader  # the layer still takes its own shard


__all__ = ["METHODS", "QuantMethod", "Unquantized", "quant_method", "quantize_linears"]
