"""Native CPU kernels: compiled once per machine with the system C compiler, loaded with ctypes.

Only what PyTorch has no good op for lives here: paged decode attention (also a step's short
prompt chunks, every token a row), bf16 linear layers over panel-packed weights at every batch
size (kernels/gemm_panel.c, where the CPU has AVX-512 BF16: faster than oneDNN's packed GEMM; or
AVX2 and FMA, widening bf16 to float32 in registers; a gated MLP's gate/up projection with its SiLU
fused) and, for weights it cannot take and for float32 weights, at decode-sized batches over plain
weights (kernels/linear_small.c), greedy choice
with its log-probability in one pass over the logits (kernels/greedy.c), and a layer's small
element-wise steps — RMSNorm (alone or after the residual add), rotary embedding,
SiLU-and-multiply, the K/V cache write — as one pass each (kernels/elementwise.c). If no compiler is
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

_SOURCES = [os.path.join(os.path.dirname(__file__), "kernels", name) for name in ("paged_attention.c", "linear_small.c",
                                                                                  "greedy.c", "elementwise.c",
                                                                                  "decode_stack.c",
                                                                                  "gemm_panel.c")]
# included by the sources above (part of the build's cache key, not compiled on their own)
_HEADERS = [os.path.join(os.path.dirname(__file__), "kernels", name) for name in ("avx512_bf16.h", "avx2_bf16.h")]
# TGSERVE_CPU_MARCH builds for another target than this CPU (e.g. x86-64-v3: the AVX2 kernels a CPU
# without AVX-512 runs, tested on one that has it); the default is this CPU's own instructions
MARCH_ENV = "TGSERVE_CPU_MARCH"


def _flags() -> list[str]:
    return ["-O3", f"-march={os.environ.get(MARCH_ENV) or 'native'}", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# the dtypes each element-wise kernel takes: only where it gives PyTorch's own bits (elementwise.c)
_ELEMENTWISE = {"rms_norm": (torch.bfloat16,), "add_rms_norm": (torch.bfloat16,),
                "rotary": (torch.float32, torch.bfloat16), "silu_mul": (torch.bfloat16,)}


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
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            source += f.read()
    flags = _flags()
    key = hashlib.sha256(source + " ".join(flags).encode() + platform.machine().encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "tgserve", "kernels")
    path = os.path.join(cache, f"kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run([compiler, *flags, "-o", tmp, *_SOURCES, "-lm"], capture_output=True, text=True)
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
    lib.linear_small_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.linear_small_f32.restype = None
    lib.linear_small_f32_available.restype = ctypes.c_int
    for name in ("gemm_panel_bf16", "gemm_panel_bf16_f32"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
        getattr(lib, name).restype = None
    lib.gemm_panel_available.restype = ctypes.c_int
    lib.gemm_panel_silu_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.gemm_panel_silu_bf16.restype = None
    lib.greedy_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.greedy_f32.restype = None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.llama_decode_stack_bf16.argtypes = ([ptr, i32, ptr] + [i32] * 6 + [ctypes.c_float] + [ptr] * 6
                                            + [i32, i32, ctypes.c_float])
    lib.llama_decode_stack_bf16.restype = ctypes.c_int
    lib.write_kv.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64]
    lib.write_kv.restype = ctypes.c_int
    for name, args in (("rms_norm", [ptr] * 3 + [i64, i64, ctypes.c_float]),
                       ("add_rms_norm", [ptr] * 5 + [i64, i64, ctypes.c_float]),
                       ("rotary", [ptr, i64, ptr, i64] + [ptr] * 5 + [i64, i32, i32, i32]),
                       ("silu_mul", [ptr, ptr, i64, i64])):
        for dtype in _ELEMENTWISE[name]:
            fn = getattr(lib, f"{name}_{_SUFFIX[dtype]}")
            fn.argtypes, fn.restype = args, None
    return lib


@functools.cache
def linear_small_rows(dtype: torch.dtype = torch.bfloat16) -> int:
    """The most rows `linear_small` takes in this dtype (0: this CPU or build has no kernel for it:
    bf16 needs AVX-512 BF16, float32 AVX2 and FMA)."""
    lib = _library()
    if lib is None:
        return 0
    if dtype == torch.bfloat16:
        return lib.linear_small_available()
    return lib.linear_small_f32_available() if dtype == torch.float32 else 0


def linear_small(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [rows, in] @ weight[out, in].T (+ bias), bf16 or float32 (x, weight and bias alike), for at
    most linear_small_rows(dtype) rows; None where the kernel cannot take it (then the caller's own
    path runs)."""
    rows, dtype = x.shape[0], weight.dtype
    if (x.dtype != dtype or x.device.type != "cpu" or not weight.is_contiguous()
            or (bias is not None and bias.dtype != dtype) or not 0 < rows <= linear_small_rows(dtype)):
        return None
    x = x.contiguous()
    out_features, in_features = weight.shape
    y = torch.empty(rows, out_features, dtype=dtype)
    fn = _library().linear_small_bf16 if dtype == torch.bfloat16 else _library().linear_small_f32
    fn(x.data_ptr(), weight.data_ptr(), bias.contiguous().data_ptr() if bias is not None else None, y.data_ptr(),
       rows, out_features, in_features)
    return y


@functools.cache
def _kernel(name: str, dtype: torch.dtype):
    """The library's function `name` for `dtype` (looked up once), or None."""
    lib = _library()
    return getattr(lib, f"{name}_{_SUFFIX[dtype]}") if lib is not None else None


PANEL = 64  # output columns per panel of a panel-packed weight (kernels/gemm_panel.c)


@functools.cache
def gemm_panel_available() -> bool:
    """Whether the panel GEMM was built: CPUs with AVX-512 BF16, or AVX2 and FMA."""
    lib = _library()
    return lib is not None and lib.gemm_panel_available() != 0


def panels_take(weight: torch.Tensor) -> bool:
    """Whether `panel_pack` takes this weight: bf16 on the CPU, out a multiple of 64, in even, and
    a build with the panel GEMM (AVX-512 BF16 or AVX2)."""
    out_features, in_features = weight.shape
    return (weight.dtype == torch.bfloat16 and weight.is_cpu and out_features % PANEL == 0 and in_features % 2 == 0
            and gemm_panel_available())


def panel_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 CPU weight [out, in] repacked for `gemm_panel` ([out / 64, in / 2, 64, 2]), or None
    where the kernel cannot take it (`panels_take`)."""
    if not panels_take(weight):
        return None
    out_features, in_features = weight.shape
    w = weight.detach().reshape(out_features // PANEL, PANEL, in_features // 2, 2)
    return w.permute(0, 2, 1, 3).contiguous()


def _panel_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., in] as the contiguous [rows, in] bf16 CPU matrix the panel kernels read."""
    if x.dtype != torch.bfloat16 or not x.is_cpu or x.shape[-1] != in_features:
        raise ValueError(f"a panel-packed bf16 linear takes bf16 CPU input [..., {in_features}], "
                         f"not {x.dtype} {tuple(x.shape)} on {x.device}")
    return x.reshape(-1, in_features).contiguous()


def gemm_panel(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [..., in] (bf16, CPU) @ the panel-packed weight's [out, in].T (+ bias): [..., out] in bf16,
    or with out_dtype float32 the same bf16 values as float32 (what `.float()` of the bf16 result
    gives, written directly: an LM head's logits)."""
    out_features, in_features = panels.shape[0] * PANEL, panels.shape[1] * 2
    x2 = _panel_input(x, in_features)
    rows = x2.shape[0]
    if bias is not None and bias.numel() != out_features:
        raise ValueError(f"a bias of {bias.numel()} values for a linear with {out_features} outputs")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the panel GEMM writes bf16 or float32, not {out_dtype}")
    y = torch.empty(*x.shape[:-1], out_features, dtype=out_dtype)
    if rows:
        bias = bias.to(torch.bfloat16).contiguous() if bias is not None else None
        fn = _library().gemm_panel_bf16 if out_dtype == torch.bfloat16 else _library().gemm_panel_bf16_f32
        fn(x2.data_ptr(), panels.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(), rows,
           out_features, in_features)
    return y


def gemm_panel_silu(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of a fused [gate | up] linear (no bias) held as panels, in one native call
    (each core applies the SiLU to the tiles it computed): the bits of `gemm_panel` then
    `silu_mul`. None where the halves are not whole panels."""
    if panels.shape[0] % 2:
        return None
    out_features, in_features = panels.shape[0] * PANEL, panels.shape[1] * 2
    x2 = _panel_input(x, in_features)
    rows = x2.shape[0]
    y = torch.empty(*x.shape[:-1], out_features // 2, dtype=torch.bfloat16)
    if rows:
        scratch = torch.empty(rows, out_features, dtype=torch.bfloat16)
        _library().gemm_panel_silu_bf16(x2.data_ptr(), panels.data_ptr(), scratch.data_ptr(), y.data_ptr(), rows,
                                        out_features, in_features)
    return y


def _elementwise(name: str, *tensors: torch.Tensor):
    """The kernel `name` for these CPU tensors' dtype (all the same), or None."""
    dtype = tensors[0].dtype
    if dtype not in _ELEMENTWISE[name]:
        return None
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype:
            return None
    return _kernel(name, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Llama's RMSNorm of x [..., hidden] in one pass (float32 statistics); None if not here."""
    fn = _elementwise("rms_norm", x, weight)
    if fn is None or not x.is_contiguous() or not weight.is_contiguous():
        return None
    out = torch.empty_like(x)
    fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + y, rms_norm(x + y)) in one pass, rounded as the two ops round; None if not here."""
    fn = _elementwise("add_rms_norm", x, y, weight)
    if fn is None or x.shape != y.shape or not (x.is_contiguous() and y.is_contiguous() and weight.is_contiguous()):
        return None
    total, out = torch.empty_like(x), torch.empty_like(x)
    fn(x.data_ptr(), y.data_ptr(), weight.data_ptr(), total.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
       x.shape[-1], eps)
    return total, out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> bool:
    """k, v [tokens, kv_heads, head_dim] (token rows may be strided) into the caches' slots
    ([blocks, block_size, kv_heads, head_dim], slot = block * block_size + offset), as
    index_copy_ would; False where it cannot (nothing written: the caller's own path runs)."""
    lib = _library()
    if (lib is None or not k.is_cpu or slots.dtype != torch.long or not slots.is_contiguous()
            or len({k.dtype, v.dtype, k_cache.dtype, v_cache.dtype}) != 1 or k.shape != v.shape
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape != v_cache.shape
            or k.shape[1:] != k_cache.shape[2:] or slots.numel() != k.shape[0]
            or k.stride()[1:] != (k.shape[2], 1) or v.stride()[1:] != (v.shape[2], 1)):
        return False
    size = k.element_size()
    row_bytes = k.shape[1] * k.shape[2] * size
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    return lib.write_kv(k.data_ptr(), k.stride(0) * size, v.data_ptr(), v.stride(0) * size, k_cache.data_ptr(),
                        v_cache.data_ptr(), slots.data_ptr(), k.shape[0], row_bytes, num_slots) == 0


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] (rows may be strided views)
    rotated whole ("rotate half") by the cos/sin tables [positions, head_dim] at `positions`;
    new contiguous tensors, or None if not here."""
    fn = _elementwise("rotary", q, k, cos, sin)
    if (fn is None or positions.dtype != torch.long or not positions.is_contiguous() or not cos.is_contiguous()
            or not sin.is_contiguous() or q.stride()[1:] != (q.shape[2], 1) or k.stride()[1:] != (k.shape[2], 1)):
        return None
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    fn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), q_out.data_ptr(), k_out.data_ptr(),
       positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.shape[0], q.shape[1], k.shape[1], q.shape[2])
    return q_out, k_out


def silu_mul(x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up over x = [..., gate | up]; None if not here."""
    fn = _elementwise("silu_mul", x)
    if fn is None or not x.is_contiguous():
        return None
    width = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype)
    fn(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], width)
    return out


def decode_stack(pointers: torch.Tensor, layers: int, x: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int, eps: float, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                 scale: float) -> bool:
    """A Llama-family layer stack over x [rows, hidden] (bf16, updated in place) for one decode step
    (kernels/decode_stack.c; `pointers`: each layer's weights, caches and weight panels,
    layers/decode_stack.py). False where it cannot run (nothing was touched: e.g. more rows than
    the small-batch kernel takes and a linear without panels)."""
    lib = _library()
    tensors = (positions, slots, block_table, seq_lens)
    if lib is None or not x.is_contiguous() or any(t.dtype != torch.long or not t.is_contiguous() for t in tensors):
        return False
    rows, hidden = x.shape
    return lib.llama_decode_stack_bf16(
        pointers.data_ptr(), layers, x.data_ptr(), rows, hidden, heads, kv_heads, head_dim, intermediate, eps,
        positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), block_table.data_ptr(),
        seq_lens.data_ptr(), block_table.shape[1], block_size, scale) == 0


def greedy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's argmax (first maximal column) and its log-probability under the row's softmax,
    for float32 logits on the CPU; None where the kernel cannot take them."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.dim() != 2 or not scores.is_contiguous():
        return None
    lib = _library()
    if lib is None:
        return None
    rows, vocab = scores.shape
    tokens = torch.empty(rows, dtype=torch.long)
    logprobs = torch.empty(rows, dtype=torch.float32)
    lib.greedy_f32(scores.data_ptr(), rows, vocab, tokens.data_ptr(), logprobs.data_ptr())
    return tokens, logprobs


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of one query per sequence over its cached keys; None if the kernel cannot run here.

    q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [seqs, max_blocks] int64; seq_lens: [seqs] int64. Returns [seqs, heads, head_dim].
    """
    if not q.is_cpu or q.dtype not in _SUFFIX:
        return None
    fn = _kernel("paged_decode", q.dtype)
    if fn is None:
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    fn(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1], scale)
    return out
