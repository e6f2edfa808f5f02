"""Which class serves which Hugging Face architecture: a table, imported lazily."""

from __future__ import annotations

import importlib

import torch
from torch import nn

# architectures[0] of config.json → (module under tgserve.models, class)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("llama", "Phi3ForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "OPTForCausalLM": ("opt", "OPTForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("moe", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("moe", "Qwen3MoeForCausalLM"),
    "T5ForConditionalGeneration": ("t5", "T5ForConditionalGeneration"),
    "MT5ForConditionalGeneration": ("t5", "MT5ForConditionalGeneration"),
}


class UnsupportedModel(ValueError):
    pass


def model_class(hf_config) -> type[nn.Module]:
    names = getattr(hf_config, "architectures", None) or []
    for name in names:
        if name in ARCHITECTURES:
            module, cls = ARCHITECTURES[name]
            return getattr(importlib.import_module(f"tgserve.models.{module}"), cls)
    raise UnsupportedModel(
        f"architecture {names or '(none in config.json)'} is not supported; supported: {sorted(ARCHITECTURES)}"
    )


def build_model(hf_config, dtype: torch.dtype, max_model_len: int) -> nn.Module:
    return model_class(hf_config)(hf_config, dtype, max_model_len)
