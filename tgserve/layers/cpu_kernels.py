"""Native CPU kernels: compiled once per machine with the system C compiler, loaded with ctypes.

Only what PyTorch has no good op for lives here (paged decode attention). If no compiler is found
or the build fails, callers get None and fall back to the PyTorch path, which gives the same results.
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

_SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "paged_attention.c")
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
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + platform.machine().encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "tgserve", "kernels")
    path = os.path.join(cache, f"paged_attention-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run([compiler, *_FLAGS, "-o", tmp, _SOURCE, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            log.warning("building the paged attention kernel failed; using the PyTorch path:\n%s", result.stderr)
            return None
        os.replace(tmp, path)  # atomic: concurrent processes never load a half-written file
    # torch has already loaded its OpenMP runtime (same soname), so the kernel shares its threads
    lib = ctypes.CDLL(path)
    for suffix in _SUFFIX.values():
        fn = getattr(lib, f"paged_decode_{suffix}")
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float]
        fn.restype = None
    return lib


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
