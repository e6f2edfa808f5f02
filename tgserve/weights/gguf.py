"""GGUF → an ordinary Hugging Face model folder (config, tokenizer with chat template, safetensors),
once per file; the folder is then served like any other.

transformers' GGUF reader (`load_gguf_checkpoint`) does most of the work: it rebuilds the config
and the tokenizer from the metadata, maps llama.cpp's tensor names back, undoes its layouts
(Llama's q/k row permutation, GPT-2's transposes, Gemma's norm offset, BLOOM's fused QKV) and
dequantizes each tensor with gguf-py. So:
- architectures: those the reader knows (llama incl. Llama 3 / Mistral, qwen2, qwen3, qwen3moe,
  phi3, gpt2, bloom, gemma2, gemma3, t5, and some the engine serves only through its transformers
  fallback: falcon, stablelm, starcoder2, mamba, ...), plus Mixtral, which llama.cpp files as
  "llama" with stacked experts the reader skips: those are read here;
- tensor types: those gguf-py dequantizes (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, IQ*).
Anything else is refused before any work, as is LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini).

The reader drops some keys; restored here: `head_dim` (Qwen3), Gemma 2's soft-capping and the
27B Gemmas' query scale, Phi-3's sliding window, GPT-2's position count, MoE expert widths, T5's
activation / decoder depth / output scaling, and rope scaling (Llama 3.1's from its `rope_freqs`
tensor; linear; YaRN). A file whose tensors still do not fill the model, each in its shape, is
refused rather than converted into a wrong model.

Precision: each tensor is written in the file's 16-bit float type (F16 or BF16) when that holds
it exactly, else in float32 (dequantized blocks, F32 norms); nothing is rounded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile

from tgserve.config import ConfigError

log = logging.getLogger(__name__)


class UnsupportedGGUF(ConfigError):
    """A GGUF that cannot become a correct model folder (the launcher reports it as a start-up error)."""


# llama.cpp key (after "<arch>.") → HF config attribute, restored where the reader's table lacks it
_DROPPED_KEYS = {
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "decoder_block_count": "num_decoder_layers",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Write the converted model to `out_dir` atomically (a temp folder renamed at the end)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    _check_readable(reader, arch, gguf_path)
    log.info("converting %s (%s) into %s (once)", gguf_path, arch, out_dir)
    config, tensors = _model(gguf_path, reader, arch)
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


def _model(gguf_path: str, reader, arch: str):
    """(config, {name: tensor}) of the model the file holds, checked complete."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, MixtralConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(os.path.abspath(gguf_path))
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    _restore_dropped(config, reader, arch)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    experts = _field(reader, "llama.expert_count", 0) if arch == "llama" else 0
    with torch.device("meta"):  # only parameter names and shapes are used
        skeleton = mapped = auto.from_config(config)
        if experts:  # Mixtral, filed by llama.cpp as "llama": the reader maps all but the experts
            config = MixtralConfig(**config.to_diff_dict() | {"model_type": "mixtral"}, num_local_experts=experts,
                                   num_experts_per_tok=_field(reader, "llama.expert_used_count"))
            skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=mapped)["tensors"]
    if experts:
        tensors = {k: v for k, v in tensors.items() if ".mlp." not in k} | _stacked_experts(reader)
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    _check_complete(skeleton, tensors, config, gguf_path)
    narrow = _narrowed(tensors, reader)
    if narrow is not None:
        config.dtype = narrow
    return config, tensors


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _check_readable(reader, arch: str, path: str) -> None:
    """Refuse, before any work, an architecture the reader cannot map or a tensor type gguf-py
    cannot dequantize (tried on one block of zeros: gguf-py has no public list)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    # the reader's table spells llama.cpp's "qwen3moe", "gpt-oss", "minimax-m2" its own way
    if arch not in known and arch.replace("moe", "_moe").replace("-", "_") not in known:
        raise UnsupportedGGUF(f"{path}: GGUF architecture {arch!r} is not supported; "
                              f"transformers' GGUF reader knows {', '.join(known)}")
    unreadable = set()
    for qtype in {t.tensor_type for t in reader.tensors}:
        try:
            dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
        except NotImplementedError:
            unreadable.add(qtype.name)
    if unreadable:
        raise UnsupportedGGUF(f"{path}: tensor type(s) {', '.join(sorted(unreadable))} cannot be dequantized "
                              "(gguf-py reads F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants and IQ types)")
    if any(t.name.startswith("rope_factors_") for t in reader.tensors):
        raise UnsupportedGGUF(f"{path}: LongRoPE GGUFs (Phi-3 128k, Phi-3.5, Phi-4-mini) are not supported")


def _restore_dropped(config, reader, arch: str) -> None:
    """Put back what the reader's key table drops for this architecture."""
    from transformers.integrations import GGUF_CONFIG_MAPPING

    mapped = GGUF_CONFIG_MAPPING.get(arch, {})
    for key, attr in _DROPPED_KEYS.items():
        value = _field(reader, f"{arch}.{key}")
        if key not in mapped and value:  # a sliding window of 0 means none
            setattr(config, attr, value)
    if arch == "gpt2":  # the reader sets n_ctx, which GPT2Config no longer reads
        config.n_positions = _field(reader, "gpt2.context_length", config.n_positions)
    if arch == "t5":  # the reader assumes a gated FFN without its activation; llama.cpp runs gated → GELU, else ReLU
        gated = any(t.name.endswith("ffn_gate.weight") for t in reader.tensors)
        config.feed_forward_proj, config.is_gated_act = ("gated-gelu", True) if gated else ("relu", False)
        config.dense_act_fn = "gelu_new" if gated else "relu"
        # T5 v1.0 ties its LM head and scales the decoder output by d_model^-0.5, v1.1 / flan-T5 do neither
        config.scale_decoder_outputs = not any(t.name == "output.weight" for t in reader.tensors)
    if (arch, config.num_hidden_layers) in (("gemma2", 46), ("gemma3", 62)):
        # no key states the query scale; llama.cpp knows the 27B models by their depth, as here
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads
    _restore_rope(config, reader, arch)


def _restore_rope(config, reader, arch: str) -> None:
    """Rope scaling: Llama 3.1's as a `rope_freqs` tensor, linear and YaRN as metadata."""
    freqs = next((t.data for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    params = getattr(config, "rope_parameters", None)
    if params is None or (freqs is None and scaling == "none"):
        return
    rope = params.get("full_attention", params)  # Gemma 3 scales only its global layers
    if freqs is not None:
        rope.update(_llama3_rope(freqs, rope.get("rope_theta", 10000.0), config))
    elif scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=_field(reader, f"{arch}.rope.scaling.factor"))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = _field(reader, f"{arch}.rope.scaling.original_context_length")
    else:
        raise UnsupportedGGUF(f"rope scaling {scaling!r} is not supported")
    config.rope_parameters = params


def _llama3_rope(freqs, theta: float, config) -> dict:
    """Llama 3.1's rope scaling from the per-frequency divisors llama.cpp stored: its converter
    derives them from (factor, low_freq_factor, high_freq_factor, original context); the factor is
    the largest divisor, and every Llama 3.x uses 1, 4 and 8192 for the rest, checked here."""
    import numpy as np

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = dict(rope_type="llama3", factor=float(np.max(freqs)), low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
    expected = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        smooth = (8192 / wavelen - 1.0) / 3.0
        expected.append(1.0 if smooth > 1 else params["factor"] if smooth < 0
                        else 1 / ((1 - smooth) / params["factor"] + smooth))
    if not np.allclose(freqs, expected, rtol=1e-4):
        raise UnsupportedGGUF("rope_freqs are not Llama 3's (low/high frequency factors 1/4, context 8192)")
    return params


def _stacked_experts(reader) -> dict:
    """Mixtral's routers and experts from llama.cpp's stacked tensors, as transformers names them:
    blk.N.ffn_{gate,up,down}_exps [experts, out, in] → experts.gate_up_proj (gate then up), down_proj."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    def read(t) -> torch.Tensor:
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))

    parts = {t.name: t for t in reader.tensors if "ffn_gate_inp" in t.name or "_exps." in t.name}
    out = {}
    for name, t in parts.items():
        layer = name.split(".")[1]
        prefix = f"model.layers.{layer}.mlp"
        if "ffn_gate_inp" in name:
            out[f"{prefix}.gate.weight"] = read(t)
        elif "ffn_down_exps" in name:
            out[f"{prefix}.experts.down_proj"] = read(t)
        elif "ffn_gate_exps" in name:
            out[f"{prefix}.experts.gate_up_proj"] = torch.cat([read(t), read(parts[name.replace("gate", "up")])], 1)
    return out


def _check_complete(skeleton, tensors: dict, config, path: str) -> None:
    """Every parameter of the model, in its shape: a key the reader ignored (an expert count, a
    context length) shows up here, not as a wrong model later."""
    tied = getattr(config, "tie_word_embeddings", False)
    expected = {k: tuple(p.shape) for k, p in skeleton.named_parameters()  # tied aliases (T5's) listed once
                if not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(tensors))
    wrong = sorted(f"{k} {tuple(tensors[k].shape)} != {expected[k]}"
                   for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or wrong:
        raise UnsupportedGGUF(f"{path}: the GGUF does not fill a {type(skeleton).__name__} (missing {len(missing)} "
                              f"tensors, e.g. {missing[:3]}; mis-shaped {wrong[:3]}); "
                              "the file stores tensors in a way transformers' GGUF reader cannot map")


def _narrowed(tensors: dict, reader):
    """Store each tensor in the file's 16-bit float type where that is exact; the dtype the config
    should name when every matrix was stored so (a float GGUF), else None."""
    import torch
    from gguf import GGMLQuantizationType as T

    types = {t.tensor_type for t in reader.tensors}
    narrow = torch.bfloat16 if T.BF16 in types else torch.float16 if T.F16 in types else None
    if narrow is None:
        return None
    for k, v in tensors.items():
        if v.is_floating_point() and torch.equal(v.to(narrow).to(v.dtype), v):
            tensors[k] = v.to(narrow)
    return narrow if all(v.dtype == narrow for v in tensors.values() if v.dim() > 1) else None


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
