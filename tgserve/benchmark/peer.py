"""llama.cpp's `llama-server` as the peer `tgserve bench --peer llama.cpp` measures beside tgserve.

Built once from the source package of `llama-cpp-python` on PyPI (it vendors llama.cpp), into a cache
outside the repository (~/.cache/tgserve/llama.cpp/<version>, or $TGSERVE_LLAMA_CPP_DIR): none of
llama.cpp's code is part of tgserve. Release build, tuned for this CPU (GGML_NATIVE). The model is the
same weights tgserve serves: the GGUF it was converted from, re-quantized by `llama-quantize` to the
benchmark's dtype (BF16 / F16 / F32), so both servers compute in the same precision.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import urllib.request

from tgserve.benchmark.servers import launch

LLAMA_CPP_PYTHON = "0.3.36"  # vendors the llama.cpp measured in ../shared/reference/cpu-performance.md
GGUF_TYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def cache_dir() -> str:
    return os.environ.get("TGSERVE_LLAMA_CPP_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tgserve", "llama.cpp", LLAMA_CPP_PYTHON)


def _run(cmd: list[str], log: str) -> None:
    """Run a build step, its output into `log`; a failure raises with the log's tail."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {code}); log {log}:\n{tail}")


def _download_sdist(root: str) -> str:
    """The source archive from PyPI's simple index (its JSON form), checked against its sha256.
    (`pip download` would try to prepare the package's build first.)"""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/llama-cpp-python/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    entry = next((f for f in files if f["filename"] == name), None)
    if entry is None:
        raise RuntimeError(f"{name} is not on {index}")
    path, digest = os.path.join(root, name), hashlib.sha256()
    with urllib.request.urlopen(entry["url"], timeout=600) as r, open(path + ".part", "wb") as out:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{name}: sha256 mismatch")
    os.replace(path + ".part", path)
    return path


def build(say=print) -> str:
    """The folder holding llama-server and llama-quantize, built if they are not there yet."""
    root = cache_dir()
    bin_dir = os.path.join(root, "build", "bin")
    if all(os.access(os.path.join(bin_dir, b), os.X_OK) for b in ("llama-server", "llama-quantize")):
        return bin_dir
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama.cpp needs cmake and a C++ compiler (apt install cmake g++)")
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "build.log")
    source = os.path.join(root, "src")
    if not os.path.isdir(os.path.join(source, "vendor", "llama.cpp")):
        say(f"llama.cpp: downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s source package from PyPI...")
        archive = _download_sdist(root)
        unpack = os.path.join(root, "unpack")
        with tarfile.open(archive) as tar:
            tar.extractall(unpack, filter="data")
        shutil.rmtree(source, ignore_errors=True)
        os.replace(glob.glob(os.path.join(unpack, "llama_cpp_python-*"))[0], source)
        shutil.rmtree(unpack, ignore_errors=True)
    say(f"llama.cpp: building llama-server and llama-quantize (once, into {root}; several minutes)...")
    build_dir = os.path.join(root, "build")
    _run(["cmake", "-S", os.path.join(source, "vendor", "llama.cpp"), "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"], log)
    _run(["cmake", "--build", build_dir, "--config", "Release", "-j", str(os.cpu_count() or 1),
          "--target", "llama-server", "llama-quantize"], log)
    return bin_dir


def convert(bin_dir: str, gguf: str, dtype: str, say=print) -> str:
    """`gguf` re-quantized to the GGUF type of `dtype` (cached beside the build)."""
    kind = GGUF_TYPES.get(dtype)
    if kind is None:
        raise ValueError(f"no llama.cpp type for dtype {dtype!r} (one of {', '.join(GGUF_TYPES)})")
    out = os.path.join(cache_dir(), "models", os.path.basename(gguf)[:-5].split(".")[0] + f".{kind}.gguf")
    if not os.path.isfile(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        say(f"llama.cpp: converting {os.path.basename(gguf)} to {kind}...")
        _run([os.path.join(bin_dir, "llama-quantize"), "--allow-requantize", gguf, out + ".part", kind],
             os.path.join(cache_dir(), "convert.log"))
        os.replace(out + ".part", out)
    return out


def start(bin_dir: str, gguf: str, port: int, parallel: int, threads: int, context_per_slot: int = 1024
          ) -> subprocess.Popen:
    """llama-server with `parallel` slots (continuous batching), returned once /health answers 200;
    its log goes to llama-server.log in the cache."""
    cmd = [os.path.join(bin_dir, "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
           "-c", str(parallel * context_per_slot), "--cont-batching"]
    return launch(cmd, port, os.path.join(cache_dir(), "llama-server.log"), "llama-server")
