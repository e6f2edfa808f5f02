"""Loads a checkpoint into a model: one loop over its tensors, each parameter taking its own shard."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

import torch
from torch import nn

from tgserve.layers.linear import default_weight_loader
from tgserve.models.registry import build_model
from tgserve.weights.safetensors import iterate_tensors, read_header, safetensors_files

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    pass


def _fold(name: str, packed: dict[str, tuple[str, object]]) -> tuple[str, object]:
    """'…self_attn.k_proj.weight' → ('…self_attn.qkv_proj.weight', 'k') for fused parameters."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard = packed[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A model may define `checkpoint_transform(name, tensor)` → [(name, tensor)]: its checkpoint's
    own layout turned into ours (transposed Conv1D weights, q/k/v interleaved per head, renames)."""
    transform = getattr(model, "checkpoint_transform", None)
    if transform is not None:
        tensors = (pair for name, tensor in tensors for pair in transform(name, tensor))
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    ignored: tuple[str, ...] = getattr(model, "ignored_checkpoint_suffixes", ())
    params = dict(model.named_parameters())
    parts_per_fused = Counter(fused for fused, _ in packed.values())
    loaded: Counter[str] = Counter()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if name.endswith(ignored) or (getattr(model, "tied", False) and name == "lm_head.weight"):
            continue
        pname, shard = _fold(name, packed)
        param = params.get(pname)
        if param is None:
            unexpected.append(name)
            continue
        try:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
        except (ValueError, RuntimeError) as e:  # a mis-shaped tensor: name it, never half-load
            raise CheckpointMismatch(f"checkpoint tensor {name} {tuple(tensor.shape)} does not fit parameter "
                                     f"{pname} {tuple(param.shape)}: {e}") from e
        loaded[pname] += 1
    missing = []
    for pname in params:
        module_name = pname.rsplit(".", 2)[-2] if "." in pname else pname
        if loaded[pname] < parts_per_fused.get(module_name, 1):
            missing.append(pname)
    if missing:
        raise CheckpointMismatch(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
    if unexpected:  # a tensor we do not know where to put means a layout we do not understand
        raise CheckpointMismatch(f"checkpoint has {len(unexpected)} tensors this model has no place for, "
                                 f"e.g. {unexpected[:5]} (a model's known extras are listed in its "
                                 "ignored_checkpoint_suffixes)")


def load_model(folder: str, dtype: torch.dtype, device: torch.device, max_model_len: int,
               quantize: str | None = None) -> tuple[nn.Module, object]:
    """Build the architecture named in `folder`'s config.json and fill it from its safetensors.
    A GPTQ / AWQ checkpoint (its config's quantization_config) is served with its linears in its
    own int4 grid, with or without --quantize gptq / awq (quant/prequantized.py)."""
    from transformers import AutoConfig

    from tgserve.quant.prequantized import checkpoint_format

    hf_config = AutoConfig.from_pretrained(folder)
    prequantized = checkpoint_format(hf_config, quantize)
    if prequantized is not None:
        quantize = prequantized.method
        log.info("%s: a %s int4 checkpoint; its linears keep its grid", folder, quantize.upper())
    model = build_model(hf_config, dtype, max_model_len)
    if quantize is not None:
        from tgserve.quant import quantize_linears

        quantize_linears(model, quantize)
    tensors = iterate_tensors(folder)
    if prequantized is not None:
        tensors = prequantized.as_grids(tensors, checkpoint_names(folder))
    load_weights(model, tensors)
    # on the target device before after_load: its repacking is device-specific (the oneDNN layout
    # is the CPU's; a CUDA weight keeps its plain layout)
    model = model.to(device).eval()
    _keep_plain_weights(model, device)
    for module in model.modules():
        quant = getattr(module, "quant", None)
        if quant is not None:
            quant.after_load(module)
    _return_freed_memory()
    return model, hf_config


def _keep_plain_weights(model: nn.Module, device: torch.device) -> None:
    """On CPU, unquantized linears without panels (bf16 ones the panel GEMM cannot take, float32
    ones) keep their plain weight beside the oneDNN-packed one (for the small-batch kernel,
    quant/base.py) when all of them together take little of the free memory."""
    from tgserve import hardware
    from tgserve.layers.linear import LinearBase
    from tgserve.quant.base import Unquantized, plain_copies_fit

    from tgserve.layers import cpu_kernels

    if device.type != "cpu":
        return
    layers = [m for m in model.modules() if isinstance(m, LinearBase) and type(m.quant) is Unquantized
              and cpu_kernels.linear_small_rows(m.weight.dtype) and not cpu_kernels.panels_take(m.weight)]
    total = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if layers and plain_copies_fit(total, hardware.available_memory_bytes("cpu")):
        for m in layers:
            m.quant.keep_plain = True
        log.info("linears without panels keep their plain weights too (%.1f MiB) for decode-sized batches",
                 total / 2**20)


def checkpoint_names(folder: str) -> set[str]:
    """Every tensor name in the folder's safetensors files (their headers only)."""
    return {name for path in safetensors_files(folder) for name in read_header(path)[0]}


def _return_freed_memory() -> None:
    """Repacking freed the loaded copies of the weights; glibc keeps such freed memory in its
    arenas unless asked to give it back to the system."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass
