"""GGUF → an ordinary Hugging Face model folder (config, tokenizer with chat template, safetensors).

Tensors are dequantised to float32 (transformers' GGUF reader undoes llama.cpp's name mapping and
q/k permutation); the folder is then served like any other. Runs once per model, with progress bars.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Write the converted model to `out_dir` atomically (a temp folder renamed at the end)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(os.path.abspath(gguf_path))
    log.info("converting %s into %s (once)", gguf_path, out_dir)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # only its parameter names are used
    config.architectures = [type(skeleton).__name__]
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)["tensors"]
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _template_into_tokenizer_config(tmp, tokenizer.chat_template)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt", "source": os.path.basename(gguf_path)})
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _template_into_tokenizer_config(folder: str, template: str | None) -> None:
    """transformers 5 writes the chat template to its own file; older readers look in tokenizer_config."""
    if not template:
        return
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        data = json.load(f)
    data["chat_template"] = template
    with open(path, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
