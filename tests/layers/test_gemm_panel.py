"""The bf16 GEMM over panel-packed weights (layers/kernels/gemm_panel.c) against the float32
computation, and when the linears use it (quant/base.py's Unquantized)."""

from __future__ import annotations

import pytest
import torch

from tgserve.layers import cpu_kernels
from tgserve.layers.linear import LinearBase
from tgserve.weights.loader import load_model

from conftest import assert_bf16_linear_close, build_tiny_llama

needs_kernel = pytest.mark.skipif(not cpu_kernels.gemm_panel_available(),
                                  reason="neither AVX-512 BF16 nor AVX2 here (or no C compiler): the kernel is not built")


@needs_kernel
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 576), (576, 3072), (66, 128), (2, 64)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 64, 131])
def test_kernel_equals_the_float_computation(k, n, rows):
    g = torch.Generator().manual_seed(k * n + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    panels = cpu_kernels.panel_pack(w)
    assert panels.shape == (n // 64, k // 2, 64, 2)
    assert_bf16_linear_close(cpu_kernels.gemm_panel(x, panels, b), x, w, b)
    assert_bf16_linear_close(cpu_kernels.gemm_panel(x, panels, None), x, w, None)


@needs_kernel
def test_leading_dimensions_and_strided_input_are_taken_and_bad_input_is_refused():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 64, generator=g).bfloat16()
    panels = cpu_kernels.panel_pack(w)
    x = torch.randn(2, 3, 64, generator=g).bfloat16()
    assert_bf16_linear_close(cpu_kernels.gemm_panel(x, panels, None).reshape(6, 128), x.reshape(6, 64), w, None)
    wide = torch.randn(5, 128, generator=g).bfloat16()[:, ::2]  # rows with a stride
    assert_bf16_linear_close(cpu_kernels.gemm_panel(wide, panels, None), wide, w, None)
    assert cpu_kernels.gemm_panel(torch.empty(0, 64).bfloat16(), panels, None).shape == (0, 128)
    with pytest.raises(ValueError, match="bf16 CPU input"):
        cpu_kernels.gemm_panel(torch.randn(2, 64), panels, None)  # float32
    with pytest.raises(ValueError, match="bf16 CPU input"):
        cpu_kernels.gemm_panel(torch.randn(2, 32).bfloat16(), panels, None)  # wrong width
    with pytest.raises(ValueError, match="a bias of 64 values"):
        cpu_kernels.gemm_panel(x, panels, torch.zeros(64).bfloat16())  # the kernel would read past it


def test_shapes_and_dtypes_the_kernel_cannot_take_are_not_packed():
    assert cpu_kernels.panel_pack(torch.randn(100, 64).bfloat16()) is None  # out not a multiple of 64
    assert cpu_kernels.panel_pack(torch.randn(64, 33).bfloat16()) is None  # odd in
    assert cpu_kernels.panel_pack(torch.randn(64, 64)) is None  # float32: oneDNN's packed copy


@needs_kernel
def test_bf16_linears_of_fitting_shape_run_the_panel_gemm_at_every_batch_size(tmp_path):
    folder = build_tiny_llama(str(tmp_path / "m"), tie_word_embeddings=True)
    model, _ = load_model(folder, torch.bfloat16, torch.device("cpu"), 128)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    paneled = [m for m in linears if m.out_features % 64 == 0 and m.in_features % 2 == 0]
    assert paneled, "the tiny model should have some linear of a shape the kernel takes"
    for layer in paneled:  # the panels are the only copy, and every row count runs on them
        assert layer.panel_weight is not None and layer.packed_weight is None and layer.weight is None
        assert layer.small_weight is None
        n, half, _, _ = layer.panel_weight.shape
        w = layer.panel_weight.permute(0, 2, 1, 3).reshape(n * 64, half * 2)  # the weight, unpacked
        for rows in (1, 2, 4, 5, 40):
            x = torch.randn(rows, layer.in_features).bfloat16()
            y = layer(x)
            assert_bf16_linear_close(y, x, w, layer.bias)
            assert torch.equal(y, cpu_kernels.gemm_panel(x, layer.panel_weight, layer.bias))
    float_model, _ = load_model(folder, torch.float32, torch.device("cpu"), 128)
    assert all(getattr(m, "panel_weight", None) is None for m in float_model.modules() if isinstance(m, LinearBase))


@needs_kernel
@pytest.mark.parametrize("k, width", [(576, 1536), (64, 128), (66, 64)])
@pytest.mark.parametrize("rows", [1, 4, 5, 7, 64, 131])
def test_gate_up_with_its_silu_gives_the_bits_of_the_gemm_then_the_silu(k, width, rows):
    g = torch.Generator().manual_seed(k + width + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(2 * width, k, generator=g) * 0.2).bfloat16()
    panels = cpu_kernels.panel_pack(w)
    fused = cpu_kernels.gemm_panel_silu(x, panels)
    assert fused.shape == (rows, width)
    assert torch.equal(fused, cpu_kernels.silu_mul(cpu_kernels.gemm_panel(x, panels, None)))


@needs_kernel
def test_gate_up_silu_needs_whole_panels_per_half():
    panels = cpu_kernels.panel_pack(torch.randn(192, 64).bfloat16())  # 3 panels: 96 gate, 96 up
    assert cpu_kernels.gemm_panel_silu(torch.randn(5, 64).bfloat16(), panels) is None


@needs_kernel
def test_a_llama_mlp_takes_the_fused_path_at_every_row_count(tmp_path):
    folder = build_tiny_llama(str(tmp_path / "m"), intermediate_size=128)
    model, _ = load_model(folder, torch.bfloat16, torch.device("cpu"), 128)
    mlp = model.model.layers[0].mlp
    for rows in (1, 4, 5, 40):
        x = torch.randn(rows, mlp.gate_up_proj.in_features).bfloat16()
        fused = mlp.gate_up_proj.forward_silu_mul(x)
        unfused = mlp.act(mlp.gate_up_proj(x))
        assert torch.equal(fused, unfused)
        assert torch.equal(mlp(x), mlp.down_proj(unfused))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_float32_output_holds_the_bf16_results_values(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    panels = cpu_kernels.panel_pack(torch.randn(192, 96, generator=g).bfloat16())
    b = torch.randn(192, generator=g).bfloat16()
    f32 = cpu_kernels.gemm_panel(x, panels, b, torch.float32)
    assert f32.dtype == torch.float32 and torch.equal(f32, cpu_kernels.gemm_panel(x, panels, b).float())
    with pytest.raises(ValueError, match="bf16 or float32"):
        cpu_kernels.gemm_panel(x, panels, b, torch.float16)


@needs_kernel
def test_an_lm_head_with_panels_gives_float32_logits_of_the_bf16_values(tmp_path):
    folder = build_tiny_llama(str(tmp_path / "m"), vocab_size=448, tie_word_embeddings=True)  # 7 panels
    model, _ = load_model(folder, torch.bfloat16, torch.device("cpu"), 128)
    head = model.lm_head
    assert head.panel_weight is not None
    hidden = torch.randn(3, head.panel_weight.shape[1] * 2).bfloat16()
    logits = head(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (3, 448)
    assert torch.equal(logits, head.quant.apply(head, hidden, None).float())
    assert_bf16_linear_close(logits.bfloat16(), hidden, model.model.embed_tokens.weight, None)
