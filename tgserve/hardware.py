"""Facts about the machine that pick defaults: device, fast dtypes, memory."""

from __future__ import annotations

import os
import socket

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    """bf16 runs fast with native instructions (AVX-512 BF16 or AMX: oneDNN's and our kernels), and
    with our native kernels on CPUs with AVX2 and FMA (e.g. AMD Zen 3): their panel GEMM widens bf16
    weights in registers, reading half a float32 weight's bytes — one stream decodes ~2.8x faster
    than in float32 and 64 streams ~10% faster, a 500-token prefill ~15-25% slower (measured with the
    kernels built for Zen 3 and PyTorch held to AVX2, README). Else bf16 is emulated: float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    words = set(flags.split())
    if "avx512_bf16" in words or "amx_bf16" in words:
        return True
    if "avx2" in words and "fma" in words:
        from tgserve.layers import cpu_kernels  # builds them once (cached), as the engine would

        return cpu_kernels.gemm_panel_available()
    return False


def default_dtype(device: str) -> str:
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def available_memory_bytes(device: str) -> int:
    """Free memory the KV cache may draw on: device memory on CUDA, MemAvailable on CPU."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_cores() -> int:
    """Cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
