"""The native element-wise kernels (layers/kernels/elementwise.c) against PyTorch's formulas where
the layers use them: RMSNorm in bfloat16 and the rotary embedding in bfloat16 and float32 (also
over the strided q/k views of a fused qkv projection) give its bits; SiLU-and-multiply in bfloat16
differs only where the float32 silu sits on a bf16 rounding boundary (the exp implementations
differ in the last float32 bit)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.layers import cpu_kernels
from tgserve.layers.activation import SiluAndMul
from tgserve.layers.norm import RMSNorm
from tgserve.layers.position import RotaryEmbedding, _rotate_half


def native_or_skip(result):
    if result is None:
        pytest.skip("no native kernels here")
    return result


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (64, 576), (5, 40)])
def test_bf16_rms_norm_is_bit_exact(rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(torch.bfloat16)
    weight = torch.randn(hidden, generator=g).to(torch.bfloat16)
    native = native_or_skip(cpu_kernels.rms_norm(x, weight, 1e-5))
    assert torch.equal(native, torch_rms_norm(x, weight, 1e-5))
    layer = RMSNorm(hidden, 1e-5, torch.bfloat16)
    layer.weight.data.copy_(weight)
    assert torch.equal(layer(x), native)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (64, 576), (5, 40)])
def test_bf16_residual_add_then_rms_norm_in_one_pass_is_bit_exact(rows, hidden):
    g = torch.Generator().manual_seed(rows + 7)
    x, y = ((torch.randn(rows, hidden, generator=g) * 3).to(torch.bfloat16) for _ in range(2))
    weight = torch.randn(hidden, generator=g).to(torch.bfloat16)
    total, normed = native_or_skip(cpu_kernels.add_rms_norm(x, y, weight, 1e-5))
    assert torch.equal(total, x + y)  # the bf16 add's rounding
    assert torch.equal(normed, torch_rms_norm(x + y, weight, 1e-5))
    layer = RMSNorm(hidden, 1e-5, torch.bfloat16)
    layer.weight.data.copy_(weight)
    fused = layer.add_forward(x, y)
    assert torch.equal(fused[0], total) and torch.equal(fused[1], normed)
    # float32 (and any norm the kernel does not take) adds, then normalises, as two steps
    x32, y32 = x.float(), y.float()
    layer32 = RMSNorm(hidden, 1e-5)
    layer32.weight.data.copy_(weight.float())
    assert cpu_kernels.add_rms_norm(x32, y32, layer32.weight, 1e-5) is None
    s, h = layer32.add_forward(x32, y32)
    assert torch.equal(s, x32 + y32) and torch.equal(h, layer32(x32 + y32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_write_equals_index_copy_also_from_strided_rows(dtype):
    g = torch.Generator().manual_seed(3)
    blocks, block_size, kv_heads, head_dim, tokens = 6, 4, 3, 8, 5
    qkv = torch.randn(tokens, 40 + 2 * kv_heads * head_dim, generator=g).to(dtype)  # a fused projection
    k = qkv[:, 40:40 + kv_heads * head_dim].view(tokens, kv_heads, head_dim)  # strided rows
    v = qkv[:, 40 + kv_heads * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.tensor([5, 0, 23, 9, 10])
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    expected[0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    expected[1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    if not cpu_kernels.write_kv(k, v, *caches, slots):
        pytest.skip("no native kernels here")
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    # a slot past the cache writes nothing and says so (the caller's index_copy_ then raises)
    before = [c.clone() for c in caches]
    assert not cpu_kernels.write_kv(k, v, *caches, torch.tensor([1, 2, 3, 4, blocks * block_size]))
    assert torch.equal(caches[0], before[0]) and torch.equal(caches[1], before[1])


def test_float32_rms_norm_and_silu_stay_on_pytorch():
    """float32 is the dtype compared with transformers token for token: no last-bit differences."""
    assert cpu_kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6) is None
    assert cpu_kernels.silu_mul(torch.randn(2, 8)) is None


@pytest.mark.parametrize("rows,width", [(1, 1536), (64, 1536), (3, 24)])
def test_bf16_silu_and_mul_within_a_rounding_of_pytorch(rows, width):
    x = (torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(width)) * 4).to(torch.bfloat16)
    native = native_or_skip(cpu_kernels.silu_mul(x))
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    differ = native != expected
    assert differ.float().mean() < 1e-2  # a rounding boundary now and then
    ulp = expected.float().abs() * 2 ** -7  # one bf16 step, twice over: silu's rounding, then the product's
    assert (native.float() - expected.float()).abs()[differ].le(2 * ulp[differ]).all()
    assert torch.equal(SiluAndMul()(x), native)


def test_bf16_silu_at_its_edges_is_pytorchs():
    """Zeros keep their sign, +-inf and NaN go where F.silu puts them, huge gates give 0 or the gate,
    and a tiny result (-88.5 -> -3e-37) is not flushed to zero; odd widths take the masked tail."""
    gate = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 100.0, -100.0, 88.5, -88.5,
                         -20.0, 20.0, 1e-30, -1e-30, 3.0, -3.0, 0.5, -0.5]).bfloat16()
    up = torch.ones_like(gate)
    native = native_or_skip(cpu_kernels.silu_mul(torch.cat([gate, up]).reshape(1, -1)))[0]
    expected = F.silu(gate) * up
    assert torch.equal(native.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(native[keep].view(torch.int16), expected[keep].view(torch.int16))  # bit for bit, -0 too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (2, 1, 16)])
def test_rotary_over_fused_qkv_views_is_bit_exact(dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rotary = RotaryEmbedding(inv_freq, 1.0, 4096, dtype)
    tokens = 33
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    qkv[::4] = 0.0  # zero rows: the sign of a zero result must come out as PyTorch's
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)  # strided rows
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    native = native_or_skip(cpu_kernels.rotary(q, k, positions, rotary.cos, rotary.sin))
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # signed zeros too
    assert torch.equal(native[0].view(bits), (q * cos + _rotate_half(q) * sin).view(bits))
    assert torch.equal(native[1].view(bits), (k * cos + _rotate_half(k) * sin).view(bits))
    through_layer = rotary(positions, q, k)
    assert torch.equal(through_layer[0], native[0]) and torch.equal(through_layer[1], native[1])


def test_partial_rotary_keeps_the_pytorch_path():
    rotary = RotaryEmbedding(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), 1.0, 64, torch.float32)
    q, k = torch.randn(3, 2, 32), torch.randn(3, 1, 32)  # 16 of 32 dimensions rotate
    out_q, out_k = rotary(torch.tensor([0, 1, 7]), q, k)
    assert torch.equal(out_q[..., 16:], q[..., 16:]) and torch.equal(out_k[..., 16:], k[..., 16:])
