"""Quantization methods: each linear layer owns one; the table names those `--quantize` accepts."""

from tgserve.quant.base import QuantMethod, Unquantized

METHODS: dict[str, type[QuantMethod]] = {}

__all__ = ["METHODS", "QuantMethod", "Unquantized"]
