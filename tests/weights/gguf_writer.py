"""A minimal writer of llama.cpp-style GGUF files, for tests: a Hugging Face folder (config.json,
model.safetensors, tokenizer.json) in, a .gguf out, stored the way llama.cpp's converter stores it.

llama.cpp's conventions, read from gguf-py (gguf/constants.py, gguf/tensor_mapping.py):
- tensor names from `gguf.get_tensor_name_map`, shapes as PyTorch has them;
- Llama's q/k rows permuted from the "rotate half" layout to interleaved pairs; GPT-2's Conv1D
  weights transposed to [out, in]; Gemma's norm weights stored as 1 + w (llama.cpp multiplies by w);
- matrices in the chosen tensor type, 1-D tensors (norms, biases) in F32;
- an untied model stores `output.weight`, a tied one does not (T5 v1.1 / flan-T5 always do);
- MoE experts stacked per projection, [experts, out, in], as `ffn_{gate,up,down}_exps` (Mixtral
  filed as "llama");
- Llama 3.1's rope scaling as a `rope_freqs` tensor, linear and YaRN as `rope.scaling.*` keys;
- the tokenizer as `tokenizer.ggml.*` arrays (a byte-level BPE is model "gpt2").

`write_gguf` returns the weights the file holds, in the Hugging Face layout (dequantized, with
llama.cpp's transforms undone): the reference checkpoint a converted GGUF must behave like.
gguf-py quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 in Python but not the K-quants, so
Q4_K and Q6_K blocks are packed here by a plain (not llama.cpp's optimised) rounding, then read
back with gguf-py's own dequantizer.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, MODEL_ARCH_NAMES, RopeScalingType, TokenType, get_tensor_name_map
from gguf.quants import dequantize, quantize

ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt2": "gpt2", "t5": "t5", "mt5": "t5"}
# one expert's projection, as transformers saves it; llama.cpp stacks each projection's experts
_EXPERT = re.compile(r"(.*\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.weight$")
_STACKED_NAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's names, in llama.cpp's map
BLOCK = {T.Q8_0: 32, T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q4_K: 256, T.Q6_K: 256}


def write_gguf(path: str, folder: str, qtype: T = T.F32, arch: str | None = None,
               drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Write `folder` as a GGUF at `path`; returns {HF name: the weight as the file holds it,
    float32}. For tests of refusals: `arch` overrides general.architecture, `drop` leaves out
    the named HF tensors."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    kind = cfg["model_type"]
    arch = arch or ARCH[kind]
    w = GGUFWriter(path, arch)
    w.add_name("tiny")
    _add_hparams(w, cfg, kind)
    _add_tokenizer(w, folder)
    gguf_arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == ARCH[kind])
    names = get_tensor_name_map(gguf_arch, _layers(cfg))
    tensors = {k: v for k, v in load_file(os.path.join(folder, "model.safetensors")).items() if k not in drop}
    v1_1 = kind in ("t5", "mt5") and cfg.get("scale_decoder_outputs") is False
    if v1_1:  # T5 v1.1 / flan-T5 files have their own LM head (transformers 5 saves it tied to `shared`)
        tensors["lm_head.weight"] = tensors["shared.weight"]
    reference = {}
    for hf_name, (t, experts) in _stack_experts(tensors).items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        data = _to_gguf(kind, cfg, hf_name, t.float()).numpy()
        qt = qtype if data.ndim >= 2 and data.shape[-1] % BLOCK.get(qtype, 1) == 0 else T.F32
        stored = pack(data, qt)
        w.add_tensor(gguf_name, stored, raw_dtype=qt)
        back = torch.from_numpy(np.array(dequantize(stored, qt), dtype=np.float32)).reshape(data.shape)
        back = _from_gguf(kind, cfg, hf_name, back)
        reference.update(zip(experts, back.unbind(0)) if experts else [(hf_name, back)])
    if v1_1:
        del reference["lm_head.weight"]
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg, rope))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def _stack_experts(tensors: dict) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{name: (tensor, [the per-expert names it stacks, or none])}, each projection's experts stacked
    [experts, out, in] under llama.cpp's merged name ('…mlp.experts.gate_proj.weight')."""
    out, groups = {}, {}
    for name, t in tensors.items():
        match = _EXPERT.match(name)
        if match is None:
            out[name] = (t, [])
            continue
        prefix, expert, proj = match.groups()
        stacked = f"{prefix.replace('.block_sparse_moe.', '.mlp.')}.{_STACKED_NAME.get(proj, proj)}.weight"
        groups.setdefault(stacked, {})[int(expert)] = name
    for stacked, members in groups.items():
        names = [members[e] for e in sorted(members)]
        out[stacked] = (torch.stack([tensors[n] for n in names]), names)
    return out


def pack(data: np.ndarray, qt: T) -> np.ndarray:
    """`data` [..., cols] (float32) as GGUF stores it in type `qt` (bytes for block types)."""
    if qt == T.Q4_K:
        return _q4_k(data)
    if qt == T.Q6_K:
        return _q6_k(data)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), qt)


# ---- llama.cpp's per-architecture tensor transforms, and their inverses ------------------------

def _permute(w: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's `permute`: each head's rows from halves [x0..x63 | y0..y63] to pairs (x0, y0, …)."""
    shape = w.shape
    if inverse:
        return w.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    return w.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _transform(kind: str, cfg: dict, name: str, t: torch.Tensor, inverse: bool) -> torch.Tensor:
    if kind in ("llama", "mistral", "mixtral") and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg["num_attention_heads"]
        return _permute(t, heads if "q_proj" in name else cfg.get("num_key_value_heads") or heads, inverse)
    if kind in ("gemma2", "gemma3_text") and name.endswith("norm.weight"):
        return t - 1 if inverse else t + 1
    if kind == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return t.T.contiguous()
    return t


def _to_gguf(kind, cfg, name, t):
    return _transform(kind, cfg, name, t, inverse=False)


def _from_gguf(kind, cfg, name, t):
    return _transform(kind, cfg, name, t, inverse=True)


# ---- metadata ----------------------------------------------------------------------------------

def _layers(cfg: dict) -> int:
    return cfg.get("num_hidden_layers") or cfg.get("num_layers") or cfg["n_layer"]


def _add_hparams(w: GGUFWriter, cfg: dict, kind: str) -> None:
    w.add_block_count(_layers(cfg))
    if kind == "gpt2":
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
        return
    if kind in ("t5", "mt5"):
        w.add_context_length(cfg.get("n_positions", 512))
        w.add_embedding_length(cfg["d_model"])
        w.add_feed_forward_length(cfg["d_ff"])
        w.add_decoder_block_count(cfg["num_decoder_layers"])
        w.add_head_count(cfg["num_heads"])
        w.add_key_length(cfg["d_kv"])
        w.add_value_length(cfg["d_kv"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
        w.add_layer_norm_rms_eps(cfg["layer_norm_epsilon"])
        w.add_relative_attn_buckets_count(cfg["relative_attention_num_buckets"])
        w.add_decoder_start_token_id(cfg["decoder_start_token_id"])
        return
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    global_rope = rope.get("full_attention", rope)  # Gemma 3's global layers' is llama.cpp's "freq_base"
    w.add_rope_freq_base(global_rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg["vocab_size"])
    if kind in ("llama", "mistral", "mixtral"):
        w.add_rope_dimension_count(head_dim)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if rope.get("rope_type") in ("linear", "yarn"):
        w.add_rope_scaling_type(RopeScalingType(rope["rope_type"]))
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if cfg.get("head_dim"):  # llama.cpp writes it whenever the config states it
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if kind in ("gemma2", "gemma3_text"):
        w.add_sliding_window(cfg["sliding_window"])
    if kind == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])


def _llama3_rope_factors(cfg: dict, rope: dict) -> np.ndarray:
    """Llama 3.1's scaled rope as llama.cpp stores it: one divisor per rotated pair (1 for high
    frequencies, `factor` for low ones, a smooth blend between), from the original 8192 context."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = cfg.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _add_tokenizer(w: GGUFWriter, folder: str) -> None:
    """A byte-level BPE's vocabulary, merges and special ids, as llama.cpp writes model "gpt2"."""
    with open(os.path.join(folder, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = dict(tok["model"]["vocab"])
    special = {}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "vocabulary ids must be contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id)):
        if tok_cfg.get(key) in vocab:
            add(vocab[tok_cfg[key]])
    w.add_add_bos_token(False)
    template = tok_cfg.get("chat_template")
    if template is None and os.path.exists(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja")) as f:
            template = f.read()
    if template:
        w.add_chat_template(template)


# ---- K-quant blocks (gguf-py has no Python quantizer for them) --------------------------------

def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _q4_k(data: np.ndarray) -> np.ndarray:
    """Q4_K: 256-value blocks = f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of
    32, then 128 bytes of 4-bit q; value = d·scale·q − dmin·min."""
    x = data.reshape(-1, 8, 32).astype(np.float32)
    low = np.maximum(-x.min(-1), 0)                          # [n, 8] each sub-block's offset
    step = (x.max(-1) + low) / 15                            # [n, 8]
    d, dmin = _f16(step.max(-1) / 63), _f16(low.max(-1) / 63)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(step, df, out=np.zeros_like(step), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(low, dminf, out=np.zeros_like(low), where=dminf > 0)), 0, 63).astype(np.uint8)
    scale, offset = (df * sc)[..., None], (dminf * mn)[..., None]
    q = np.clip(np.round(np.divide(x + offset, scale, out=np.zeros_like(x), where=scale > 0)), 0, 15).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] & 0x30) << 2), mn[:, :4] | ((mn[:, 4:] & 0x30) << 2),
                             (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return blocks.reshape(*data.shape[:-1], -1)


def _q6_k(data: np.ndarray) -> np.ndarray:
    """Q6_K: 256-value blocks = 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales
    (one per 16 values), f16 d; value = d·scale·(q − 32)."""
    x = data.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(x).max(-1) / 31                            # [n, 16]
    d = _f16(step.max(-1) / 127)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(step, df, out=np.zeros_like(step), where=df > 0)), -127, 127).astype(np.int8)
    scale = (df * sc)[..., None]
    q = (np.clip(np.round(np.divide(x, scale, out=np.zeros_like(x), where=scale != 0)), -32, 31) + 32)
    q = q.astype(np.uint8).reshape(-1, 256)
    nib = q.reshape(-1, 2, 2, 64) & 0x0F
    ql = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(-1, 128)
    hi = (q.reshape(-1, 2, 4, 32) >> 4).astype(np.uint8)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(*data.shape[:-1], -1)
