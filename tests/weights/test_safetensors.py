"""Our safetensors reader: the same tensors as the safetensors library, and a checkpoint read into
a model's parameters without holding the file in memory too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tgserve.weights.safetensors import iterate_tensors


def test_every_dtype_and_shape_reads_as_the_library_reads_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=g).half(), "i64": torch.arange(6).view(2, 3),
        "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = {name: t.clone() for name, t in iterate_tensors(str(tmp_path))}
    expected = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name


def test_a_sharded_checkpoint_reads_every_shard_named_in_its_index(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "other.safetensors"))  # not in the index
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}, f)
    assert sorted(name for name, _ in iterate_tensors(str(tmp_path))) == ["a", "b"]


MEASURE = r"""
import resource, sys, torch
from tgserve.weights.safetensors import iterate_tensors
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
names = [f"w{i}" for i in range(16)]
params = {n: torch.empty(1024, 2048, dtype=torch.bfloat16) for n in names}  # 64 MiB, the model
for p in params.values():
    p.zero_()
base = rss()
peak = base
for name, tensor in iterate_tensors(sys.argv[1]):
    params[name].copy_(tensor)  # float32 file -> bfloat16 parameter
    peak = max(peak, rss())
print(peak - base)
"""


@pytest.mark.slow
def test_loading_holds_one_tensor_of_the_file_at_a_time_not_the_file(tmp_path):
    """A 128 MiB float32 file read into 64 MiB of bfloat16 parameters: a reader that keeps the
    file's pages (or copies each tensor before converting it) grows by the file's size."""
    g = torch.Generator().manual_seed(0)
    save_file({f"w{i}": torch.randn(1024, 2048, generator=g) for i in range(16)}, str(tmp_path / "model.safetensors"))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 48 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB while reading a 128 MiB file"
