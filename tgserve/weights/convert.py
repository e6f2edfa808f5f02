"""PyTorch `.bin` checkpoints → safetensors, once (TGI's download/convert step).

Pickled checkpoints are read with `weights_only=True` (no code runs) and memory-mapped; each file
becomes the safetensors file of the same part (`pytorch_model-00001-of-00002.bin` →
`model-00001-of-00002.safetensors`, with the index renamed alike). Tensors that share storage
(a tied LM head) are written once: the model ties them again from its config.
"""

from __future__ import annotations

import json
import logging
import os
import re

log = logging.getLogger(__name__)
_BIN = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")


def bin_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if _BIN.match(n))


def _target(name: str) -> str:
    return "model" + name[len("pytorch_model"):-len(".bin")] + ".safetensors"


def convert_bin_checkpoint(folder: str, out_dir: str | None = None) -> str:
    """Write the safetensors version of `folder`'s .bin checkpoint into `out_dir` (default: the
    folder itself) and return it. Other files (config, tokenizer) are copied when out_dir differs."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    out_dir = out_dir or folder
    os.makedirs(out_dir, exist_ok=True)
    names = bin_files(folder)
    if not names:
        raise FileNotFoundError(f"no pytorch_model*.bin in {folder}")
    if out_dir != folder:
        for n in os.listdir(folder):
            if not n.endswith(".bin") and not n.endswith(".bin.index.json") and os.path.isfile(os.path.join(folder, n)):
                shutil.copy(os.path.join(folder, n), out_dir)
    log.info("converting %d .bin file(s) in %s to safetensors (once)", len(names), folder)
    weight_map = {}
    for name in tqdm(names, desc="converting .bin to safetensors", unit="file"):
        state = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True, mmap=True)
        seen: dict[tuple[int, int], str] = {}
        tensors = {}
        for key, tensor in state.items():
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if where in seen and tensor.numel() > 0:  # shares storage with one already written
                continue
            seen[where] = key
            tensors[key] = tensor.contiguous()
        target = _target(name)
        save_file(tensors, os.path.join(out_dir, target + ".tmp"), metadata={"format": "pt", "source": name})
        os.replace(os.path.join(out_dir, target + ".tmp"), os.path.join(out_dir, target))
        weight_map.update({key: target for key in tensors})
    if len(names) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return out_dir
