"""Each --quantize method on single linear layers: its output is x @ dequantize(q(W)).T (the
reference of quant/reference.py) for decode-sized and prefill-sized inputs; fused parameters load
part by part at their offsets; tensor-parallel shards compose into the unsharded computation; the
float weight is gone once the last part is in; bitsandbytes is imported only when asked for."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tgserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   ReplicatedLinear, RowParallelLinear)
from tgserve.quant import quant_method

from quant.reference import METHODS, needs_package, ranks, reference_matmul

IN = 192
# decode rows (the packed kernels), a batch past int8's switch to dequantize-then-GEMM, a prefill chunk
ROWS = [1, 7, 40, 300]
# max |error| over max |reference|: the kernels round their output once more or sum in another order
TOL = 1e-2
# how far the dequantized weight may be from the float one (relative Frobenius norm)
QUANT_ERROR = {"int8": 0.01, "bitsandbytes": 0.01, "int4": 0.12, "bitsandbytes-nf4": 0.12, "bitsandbytes-fp4": 0.15}
BYTES_PER_WEIGHT = {"int8": 1.1, "bitsandbytes": 1.1, "int4": 0.65, "bitsandbytes-nf4": 0.6, "bitsandbytes-fp4": 0.6}


def weights(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def inputs(rows: int, features: int = IN, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))
    x[:, 5] = 8.0  # an outlier feature: LLM.int8 keeps it out of its int8 rows
    return x


def loaded(layer, *parts):
    """Each (full tensor, shard id) through the weight's own loader, then after_load."""
    for full, shard in parts:
        layer.weight.weight_loader(layer.weight, full, shard)
    layer.quant.after_load(layer)
    return layer


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL) -> None:
    err = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.4g} over a reference of max {scale:.4g}"


def out_of(layer, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return layer.quant.apply(layer, x.to(layer.dtype), None)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("out", [128, 48], ids=["out128", "out48"])  # 48: bitsandbytes' unpacked CPU path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_output_is_the_dequantized_matmul(method, dtype, out, rows):
    needs_package(method)
    w, bias = weights(out, IN), weights(out, seed=2)
    layer = ReplicatedLinear(IN, out, bias=True, dtype=dtype, quant=quant_method(method))
    layer.bias.weight_loader(layer.bias, bias)
    loaded(layer, (w, None))
    x = inputs(rows).to(dtype)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, out)
    deq = layer.quant.dequantize(layer)
    assert_close(y, reference_matmul(method, x, deq) + bias.to(dtype).float(), f"{method} {dtype} {rows} rows")
    rel = ((deq - w.to(dtype).float()).norm() / w.norm()).item()
    assert rel < QUANT_ERROR[method], f"{method}: dequantized weight {rel:.3f} away from the float one"


@pytest.mark.parametrize("method", METHODS)
def test_float_weight_is_gone_and_bytes_shrink(method):
    needs_package(method)
    layer = loaded(ReplicatedLinear(IN, 128, dtype=torch.bfloat16, quant=quant_method(method)),
                   (weights(128, IN), None))
    assert layer.weight is None
    with torch.inference_mode():
        layer(inputs(1).bfloat16())  # bitsandbytes' 4-bit repacks on its first CPU call
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert stored <= BYTES_PER_WEIGHT[method] * 128 * IN, f"{method}: {stored} bytes for {128 * IN} weights"


@pytest.mark.parametrize("method", METHODS)
def test_fused_parts_load_at_their_offsets(method):
    """q/k/v (and gate/up) loaded one by one, in any order, quantize to what the concatenated
    weight quantizes to; the layer is quantized as its last part arrives, not before."""
    needs_package(method)
    q, k, v = weights(128, IN, seed=3), weights(64, IN, seed=4), weights(64, IN, seed=5)
    qkv = QKVParallelLinear(IN, 32, 4, 2, quant=quant_method(method))
    for full, shard in ((v, "v"), (q, "q")):
        qkv.weight.weight_loader(qkv.weight, full, shard)
        assert not qkv.quant.quantized
    qkv.weight.weight_loader(qkv.weight, k, "k")
    assert qkv.quant.quantized and qkv.quant._staged is None
    qkv.quant.after_load(qkv)
    whole = loaded(ReplicatedLinear(IN, 256, quant=quant_method(method)), (torch.cat([q, k, v]), None))
    assert torch.equal(qkv.quant.dequantize(qkv), whole.quant.dequantize(whole))

    gate, up = weights(64, IN, seed=6), weights(192, IN, seed=7)
    merged = loaded(MergedColumnParallelLinear(IN, [64, 192], quant=quant_method(method)), (up, 1), (gate, 0))
    whole = loaded(ReplicatedLinear(IN, 256, quant=quant_method(method)), (torch.cat([gate, up]), None))
    assert torch.equal(merged.quant.dequantize(merged), whole.quant.dequantize(whole))
    x = inputs(3)
    assert_close(out_of(merged, x), reference_matmul(method, x, whole.quant.dequantize(whole)), method)


@pytest.mark.parametrize("method", METHODS)
def test_a_part_loaded_twice_is_an_error(method):
    needs_package(method)
    layer = ReplicatedLinear(IN, 64, quant=quant_method(method))
    layer.weight.weight_loader(layer.weight, weights(64, IN), None)
    with pytest.raises(ValueError, match="loaded twice"):
        layer.weight.weight_loader(layer.weight, weights(64, IN), None)


@pytest.mark.parametrize("method", METHODS)
def test_tensor_parallel_shards_compose(method, monkeypatch):
    """Column shards: concatenated outputs, and their dequantized weights are the unsharded one's
    rows. Row shards (each quantized on its own, bitsandbytes' 4-bit in blocks of 32 here): outputs sum to the
    reference over the concatenated dequantized shards."""
    needs_package(method)
    x = inputs(5)
    w = weights(128, IN, seed=8)
    cols = ranks(monkeypatch, lambda: loaded(ColumnParallelLinear(IN, 128, quant=quant_method(method)), (w, None)))
    whole = loaded(ReplicatedLinear(IN, 128, quant=quant_method(method)), (w, None))
    assert torch.equal(torch.cat([c.quant.dequantize(c) for c in cols]), whole.quant.dequantize(whole))
    assert_close(torch.cat([out_of(c, x) for c in cols], dim=-1),
                 reference_matmul(method, x, whole.quant.dequantize(whole)), f"{method} column shards")

    rows = ranks(monkeypatch, lambda: loaded(RowParallelLinear(IN, 128, quant=quant_method(method)), (w, None)))
    halves = x.chunk(2, dim=1)
    got = sum(out_of(r, h).float() for r, h in zip(rows, halves))
    expected = sum(reference_matmul(method, h, r.quant.dequantize(r)) for r, h in zip(rows, halves))
    assert_close(got, expected, f"{method} row shards")
    deq = torch.cat([r.quant.dequantize(r) for r in rows], dim=1)
    assert ((deq - w).norm() / w.norm()).item() < QUANT_ERROR[method]


def test_int4_takes_int8_where_its_kernel_cannot(caplog):
    """A 24x40 layer: the int8 kernel cannot take 40 input features either (dequantize-then-GEMM)."""
    layer = loaded(ReplicatedLinear(40, 24, quant=quant_method("int4")), (weights(24, 40), None))
    assert layer.qweight.dtype == torch.int8 and "quantized to int8" in caplog.text
    x = inputs(3, 40)
    assert_close(out_of(layer, x), reference_matmul("int8", x, layer.quant.dequantize(layer)), "int4 → int8")


def test_bitsandbytes_is_imported_only_when_asked_for(monkeypatch):
    code = ("import sys, torch; from tgserve.weights.loader import load_model; "
            "from tgserve.layers.linear import ReplicatedLinear; from tgserve.quant import quant_method; "
            "[ReplicatedLinear(64, 64, quant=quant_method(m)) for m in ('int8', 'int4')]; "
            "assert 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install"):
        ReplicatedLinear(64, 64, quant=quant_method("bitsandbytes-nf4"))


@pytest.mark.parametrize("method", METHODS)
def test_inputs_that_are_views(method):
    """A column slice (not contiguous) and a contiguous view at an odd offset (not aligned, which
    the int8 kernel's aligned loads would fault on) give the same output as a fresh tensor."""
    needs_package(method)
    layer = loaded(ReplicatedLinear(IN, 64, dtype=torch.bfloat16, quant=quant_method(method)), (weights(64, IN), None))
    x = inputs(3).bfloat16()
    wide = torch.zeros(3, IN + 8, dtype=torch.bfloat16)
    wide[:, 1:1 + IN] = x
    flat = torch.zeros(3 * IN + 1, dtype=torch.bfloat16)
    flat[1:] = x.reshape(-1)
    fresh = out_of(layer, x)
    for view in (wide[:, 1:1 + IN], flat[1:].view(3, IN)):
        assert torch.equal(out_of(layer, view), fresh)
