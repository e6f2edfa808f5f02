"""The linear kernels for decode-sized batches (layers/kernels/linear_small.c) — bf16 against the
float32 computation, float32 against float64 — and when the linears use them (quant/base.py's
Unquantized, the loader's memory policy)."""

from __future__ import annotations

import pytest
import torch

from tgserve.layers import cpu_kernels
from tgserve.layers.linear import LinearBase
from tgserve.quant import base
from tgserve.weights.loader import load_model

from conftest import assert_bf16_linear_close, build_tiny_llama

needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_small_rows(),
                                  reason="no AVX-512 BF16 on this CPU (or no C compiler): the kernel is not built")


@needs_kernel
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (100, 50), (33, 7), (64, 3)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_kernel_equals_the_float_computation(k, n, rows):
    g = torch.Generator().manual_seed(k * n + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    assert_bf16_linear_close(cpu_kernels.linear_small(x, w, b), x, w, b)
    assert_bf16_linear_close(cpu_kernels.linear_small(x, w, None), x, w, None)


@needs_kernel
def test_what_the_kernel_does_not_take_is_left_to_the_caller():
    w = torch.randn(8, 64).bfloat16()
    assert cpu_kernels.linear_small(torch.randn(5, 64).bfloat16(), w, None) is None  # too many rows
    assert cpu_kernels.linear_small(torch.randn(1, 64), w, None) is None  # x float32, w bf16
    assert cpu_kernels.linear_small(torch.randn(1, 64).half(), w.half(), None) is None  # float16
    assert cpu_kernels.linear_small(torch.randn(1, 64).bfloat16(), w.t().contiguous().t(), None) is None


@needs_kernel
def test_a_small_bf16_model_keeps_plain_weights_where_a_linear_has_no_panels_and_uses_them_for_few_rows(tmp_path):
    # gate/up 2 x 100 wide: no 64-column panels; every other linear of the layers has them
    folder = build_tiny_llama(str(tmp_path / "m"), tie_word_embeddings=True, intermediate_size=100)
    model, _ = load_model(folder, torch.bfloat16, torch.device("cpu"), 128)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    for m in linears:  # one repacked copy each; the plain one beside it only where there are no panels
        if m.panel_weight is not None:
            assert m.small_weight is None and m.packed_weight is None
        else:
            assert m.small_weight is not None and m.packed_weight is not None
    layer = model.model.layers[0].mlp.gate_up_proj
    assert layer.panel_weight is None
    assert model.lm_head.small_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied: no copy
    for rows in (1, 4, 9):  # the kernel, then oneDNN's
        x = torch.randn(rows, layer.in_features).bfloat16()
        assert_bf16_linear_close(layer(x), x, layer.small_weight, None)


@needs_kernel
def test_a_model_whose_linears_take_much_memory_keeps_only_the_packed_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "PLAIN_COPY_SHARE", 0.0)
    folder = build_tiny_llama(str(tmp_path / "m"), tie_word_embeddings=True)
    model, _ = load_model(folder, torch.bfloat16, torch.device("cpu"), 128)
    assert all(m.small_weight is None for m in model.modules() if isinstance(m, LinearBase))
    assert model.lm_head.panel_weight is None  # the tiny vocabulary (400) is not whole panels
    assert model.lm_head.small_weight is not None  # a tied head costs nothing to keep


needs_f32_kernel = pytest.mark.skipif(not cpu_kernels.linear_small_rows(torch.float32),
                                      reason="no AVX2/FMA on this CPU (or no C compiler): the kernel is not built")


@needs_f32_kernel
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (100, 50), (33, 7), (8, 3), (5, 1)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_float32_kernel_equals_the_float64_computation(k, n, rows):
    g = torch.Generator().manual_seed(k * n + rows)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (b, None):
        expected = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
        got = cpu_kernels.linear_small(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        # float32 sums of k products: a few ulps of the terms' magnitude
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * k ** 0.5 * 4)
    assert cpu_kernels.linear_small(torch.randn(5, k), w, None) is None  # more rows than it takes


@needs_f32_kernel
def test_float32_models_keep_plain_weights_and_use_them_for_few_rows(tmp_path, monkeypatch):
    model, _ = load_model(build_tiny_llama(str(tmp_path / "m")), torch.float32, torch.device("cpu"), 128)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert all(m.small_weight is not None and m.packed_weight is not None for m in linears)
    layer = model.model.layers[0].self_attn.qkv_proj
    answered = []
    real = cpu_kernels.linear_small
    monkeypatch.setattr(cpu_kernels, "linear_small", lambda *a: answered.append(real(*a) is not None) or real(*a))
    for rows in (1, 4, 9):  # the kernel, then oneDNN's
        x = torch.randn(rows, layer.in_features)
        torch.testing.assert_close(layer(x), x @ layer.small_weight.T, rtol=1e-5, atol=1e-5)
    assert answered == [True, True, False]


def test_float32_models_with_large_linears_keep_only_the_packed_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "PLAIN_COPY_SHARE", 0.0)
    model, _ = load_model(build_tiny_llama(str(tmp_path / "m")), torch.float32, torch.device("cpu"), 128)
    assert all(getattr(m, "small_weight", None) is None for m in model.modules() if isinstance(m, LinearBase))
