"""Native CPU kernels: compiled once per machine with the system C compiler, loaded with ctypes.

Only what PyTorch has no good op for lives here: paged decode attention, and bf16 linear layers at
decode-sized batches (kernels/linear_small.c, where the CPU has AVX-512 BF16). If no compiler is
found or the build fails, callers get None and fall back to the PyTorch path, which gives the same
results (up to float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import torch

log = logging.getLogger(__name__)

_SOURCES = [os.path.join(os.path.dirname(__file__), "kernels", name) for name in ("paged_attention.c", "linear_small.c")]
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        log.warning("no C compiler found: paged decode attention uses the slower PyTorch path")
        return None
    source = b""
    for path in _SOURCES:
        with open(path, "rb") as f:
            source += f.read()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + platform.machine().encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "tgserve", "kernels")
    path = os.path.join(cache, f"kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run([compiler, *_FLAGS, "-o", tmp, *_SOURCES, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            log.warning("building the native CPU kernels failed; using the PyTorch path:\n%s", result.stderr)
            return None
        os.replace(tmp, path)  # atomic: concurrent processes never load a half-written file
    # torch has already loaded its OpenMP runtime (same soname), so the kernel shares its threads
    lib = ctypes.CDLL(path)
    for suffix in _SUFFIX.values():
        fn = getattr(lib, f"paged_decode_{suffix}")
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float]
        fn.restype = None
    lib.linear_small_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.linear_small_bf16.restype = None
    lib.linear_small_available.restype = ctypes.c_int
    return lib


@functools.cache
def linear_small_rows() -> int:
    """The most rows `linear_small` takes (0: this CPU or build has no AVX-512 BF16 kernel)."""
    lib = _library()
    return lib.linear_small_available() if lib is not None else 0


def linear_small(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [rows, in] @ weight[out, in].T (+ bias), bf16, for at most linear_small_rows() rows; None
    where the kernel cannot take it (then the caller's own path runs)."""
    rows = x.shape[0]
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or not weight.is_contiguous() or (bias is not None and bias.dtype != torch.bfloat16)
            or not 0 < rows <= linear_small_rows()):
        return None
    x = x.contiguous()
    out_features, in_features = weight.shape
    y = torch.empty(rows, out_features, dtype=torch.bfloat16)
    _library().linear_small_bf16(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                                 y.data_ptr(), rows, out_features, in_features)
    return y


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of one query per sequence over its cached keys; None if the kernel cannot run here.

    q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [seqs, max_blocks] int64; seq_lens: [seqs] int64. Returns [seqs, heads, head_dim].
    """
    if q.device.type != "cpu" or q.dtype not in _SUFFIX:
        return None
    lib = _library()
    if lib is None:
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    getattr(lib, f"paged_decode_{_SUFFIX[q.dtype]}")(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1], scale)
    return out
