"""The AVX2 kernels — what a CPU with AVX2 and FMA but no AVX-512 BF16 (e.g. AMD Zen 3) runs: the panel
GEMM widening bf16 in registers, its fused SiLU, the bf16 and float32 decode attention, the decode
stack over them — checked on whatever x86-64 CPU runs the tests: the layer tests again, in a process
whose kernels are built for x86-64-v3 (TGSERVE_CPU_MARCH), so that a machine with AVX-512 tests both
builds."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or not _has_avx2() or not shutil.which("gcc"),
                                reason="needs an x86-64 CPU with AVX2 and FMA, and gcc")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ["tests/layers/test_gemm_panel.py", "tests/layers/test_elementwise_kernels.py",
         "tests/layers/test_decode_stack.py", "tests/layers/test_attention.py", "tests/layers/test_linear_small.py"]


def test_the_kernel_tests_pass_with_the_avx2_build():
    env = {**os.environ, "TGSERVE_CPU_MARCH": "x86-64-v3"}
    which = subprocess.run([sys.executable, "-c", "from tgserve.layers import cpu_kernels as k; "
                            "print(k._library().gemm_panel_available(), k.linear_small_rows(), "
                            "k.linear_small_rows(__import__('torch').float32))"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    # the AVX2 GEMM (2), no bf16 small-batch kernel (it needs AVX-512 BF16), the float32 one
    assert which.stdout.split() == ["2", "0", "4"], which.stdout + which.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not server", *FILES],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert int(summary.split(" passed")[0].split()[-1]) >= 200, summary  # the GEMM, SiLU and stack tests ran
