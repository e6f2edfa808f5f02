"""Reads a model folder's safetensors files (single file or sharded with an index).

Our own reader of the format (an 8-byte header length, a JSON header, then the raw data) over a
memory map: each tensor is a zero-copy view of the file, which the loader copies (or the part of
it a tensor-parallel rank needs) straight into the model's parameter in the model's dtype, and its
pages are then dropped from the process. Loading a checkpoint therefore costs about the model's
own size in resident memory, not the model plus the file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from typing import Iterator

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PAGE = mmap.PAGESIZE


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def read_header(path: str) -> tuple[dict, int]:
    """The file's tensor table (name → dtype, shape, data_offsets) and where its data begins."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def iterate_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of one file, in file order. A tensor is a view of the mapped
    file, valid until the next one is requested: copy what you keep."""
    header, base = read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # closed when the last view is freed
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not know")
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        begin, end = (base + o for o in info["data_offsets"])
        numel = (end - begin) // dtype.itemsize if dtype is not torch.bool else end - begin
        with warnings.catch_warnings():  # a read-only buffer: nothing writes to these views
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.frombuffer(mm, dtype=dtype, count=numel, offset=begin) if numel else torch.empty(0, dtype=dtype)
        yield name, tensor.view(shape)
        del tensor
        start = begin - begin % _PAGE
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)  # the copy is made: drop these pages


def iterate_tensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one file at a time."""
    files = safetensors_files(folder)
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    for path in files:
        yield from iterate_file(path)
