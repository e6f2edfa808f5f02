"""The CPU's default dtype: bfloat16 where bf16 runs fast — native bf16 instructions, or AVX2 and FMA
with our kernels built (their AVX2 panel GEMM) — else float32."""

from __future__ import annotations

import io

import pytest

from tgserve import hardware
from tgserve.layers import cpu_kernels


@pytest.mark.parametrize("flags, kernels, dtype", [
    ("fpu sse2 avx2 fma avx512f avx512_bf16", False, "bfloat16"),  # Zen 4, Sapphire Rapids: native bf16
    ("fpu sse2 avx2 fma amx_bf16", False, "bfloat16"),
    ("fpu sse2 avx avx2 fma", True, "bfloat16"),  # Zen 3 with the AVX2 kernels built
    ("fpu sse2 avx avx2 fma", False, "float32"),  # ... without a compiler
    ("fpu sse2 avx", True, "float32"),  # no AVX2
])
def test_the_cpus_default_dtype_follows_its_instructions_and_our_kernels(monkeypatch, flags, kernels, dtype):
    monkeypatch.setattr(hardware, "open", lambda *a, **k: io.StringIO(f"processor : 0\nflags\t\t: {flags}\n"),
                        raising=False)
    monkeypatch.setattr(cpu_kernels, "gemm_panel_available", lambda: kernels)
    assert hardware.default_dtype("cpu") == dtype
