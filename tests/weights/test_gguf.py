"""GGUF checkpoints give the same tokens as single-file safetensors holding the same weights.

Each GGUF is written in the test (tests/weights/gguf_writer.py, llama.cpp's conventions) from a tiny
random transformers model; the reference safetensors holds what the GGUF holds (for block types:
the dequantized blocks). The converted folder must hold exactly those tensors, state what the
original config states, and make our engine produce the same greedy tokens: for each tensor type
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K on Llama) and for each architecture both GGUF and
the engine carry (Llama tied, Qwen2, Qwen3, Gemma 2 and 3, GPT-2, Mixtral, Qwen3-MoE, T5 and
flan-T5). What cannot be converted is refused, naming why.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from safetensors.torch import load_file, save_file

from gguf_writer import write_gguf
from models.families import build, engine_greedy, prompts
from models.test_moe_family import sharpen_experts
from tgserve.config import ModelConfig
from tgserve.layers.moe import expert_tensors
from tgserve.weights.gguf import UnsupportedGGUF
from tgserve.weights.locate import locate_model

LLAMA = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0, bos_token_id=1,
             tie_word_embeddings=False)
K_QUANT = dict(LLAMA, hidden_size=256, intermediate_size=512)  # K-quant blocks span 256 values of a row
T5 = dict(vocab_size=400, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
          relative_attention_num_buckets=8, eos_token_id=0, pad_token_id=0, decoder_start_token_id=0,
          initializer_factor=10.0)  # llama.cpp fixes the relative attention's max distance at 128, the default
NOT_IN_GGUF = {"dtype", "_model_name_or_path", "transformers_version", "initializer_factor"}
SIXTEEN_BIT = {T.F16: torch.float16, T.BF16: torch.bfloat16}


def convert(tmp_path, config, model_cls, qtype: T, prepare=None) -> tuple[str, str]:
    """(converted folder, reference folder) for a tiny `model_cls(config)` written as a GGUF; the
    converted folder must hold exactly the reference's tensors (experts may be stacked)."""
    src = build(str(tmp_path / "src"), config, model_cls, seed=4)
    if prepare is not None:
        prepare(src)
    gguf_path = str(tmp_path / "model.gguf")
    reference = write_gguf(gguf_path, src, qtype)
    ref_dir = shutil.copytree(src, str(tmp_path / "reference"))
    save_file(reference, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
    converted = locate_model(ModelConfig(model_id=gguf_path, cache_dir=str(tmp_path / "cache")))
    got, want = (one_per_expert(load_file(os.path.join(f, "model.safetensors"))) for f in (converted, ref_dir))
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name].float(), tensor), name
    return converted, ref_dir


def one_per_expert(tensors: dict) -> dict:
    """Experts named one by one, as the engine's loader reads every spelling (Mixtral's included)."""
    return dict(pair for name, t in tensors.items()
                for pair in expert_tensors(name.replace(".block_sparse_moe.", ".mlp."), t))


def assert_same_tokens(converted: str, reference: str) -> None:
    batch = prompts(400, [5, 21, 40], seed=3)
    expected = engine_greedy(reference, batch, 8, 256, together=True)
    assert engine_greedy(converted, batch, 8, 256, together=True) == expected


def config_of(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K],
                         ids=lambda t: t.name)
def test_each_tensor_type_gives_the_tokens_of_the_same_weights(tmp_path, qtype):
    shape = K_QUANT if qtype in (T.Q4_K, T.Q6_K) else LLAMA
    converted, reference = convert(tmp_path, tf.LlamaConfig(**shape), tf.LlamaForCausalLM, qtype)
    stored = {t.tensor_type for t in GGUFReader(str(tmp_path / "model.gguf")).tensors if len(t.shape) == 2}
    assert stored == {qtype}  # every matrix really is in the type under test
    assert_same_tokens(converted, reference)
    # a 16-bit GGUF stays 16-bit (exactly); dequantized blocks and F32 norms stay float32
    matrices = {t.dtype for t in load_file(os.path.join(converted, "model.safetensors")).values() if t.dim() == 2}
    assert matrices == {SIXTEEN_BIT.get(qtype, torch.float32)}
    assert config_of(converted).get("dtype") == (str(SIXTEEN_BIT[qtype])[6:] if qtype in SIXTEEN_BIT else None)


ARCHITECTURES = {
    "llama-tied": (tf.LlamaConfig(**dict(LLAMA, tie_word_embeddings=True)), tf.LlamaForCausalLM, T.Q8_0, {}),
    "qwen2": (tf.Qwen2Config(**LLAMA), tf.Qwen2ForCausalLM, T.BF16, {}),
    "qwen3": (tf.Qwen3Config(**LLAMA, head_dim=32), tf.Qwen3ForCausalLM, T.F16, {"head_dim": 32}),
    "gemma2": (tf.Gemma2Config(**dict(LLAMA, tie_word_embeddings=True), head_dim=16, sliding_window=16,
                               attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
               tf.Gemma2ForCausalLM, T.F32, {"attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0}),
    "gemma3": (tf.Gemma3TextConfig(**dict(LLAMA, tie_word_embeddings=True), head_dim=16, sliding_window=16),
               tf.Gemma3ForCausalLM, T.F16, {"sliding_window": 16}),
    "gpt2": (tf.GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=512, eos_token_id=0,
                           bos_token_id=1), tf.GPT2LMHeadModel, T.F32, {"n_positions": 512}),
    "mixtral": (tf.MixtralConfig(**LLAMA, head_dim=16, num_local_experts=4, num_experts_per_tok=2),  # as "llama"
                tf.MixtralForCausalLM, T.Q4_0, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (tf.Qwen3MoeConfig(**LLAMA, head_dim=32, num_experts=6, num_experts_per_tok=2,
                                    moe_intermediate_size=64, norm_topk_prob=True),
                  tf.Qwen3MoeForCausalLM, T.Q8_0, {"moe_intermediate_size": 64}),
    "flan-t5": (tf.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                tf.T5ForConditionalGeneration, T.F16,
                {"dense_act_fn": "gelu_new", "is_gated_act": True, "scale_decoder_outputs": False}),
    "t5": (tf.T5Config(**T5, feed_forward_proj="relu", tie_word_embeddings=True),
           tf.T5ForConditionalGeneration, T.F32,
           {"dense_act_fn": "relu", "is_gated_act": False, "scale_decoder_outputs": True}),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_architecture_gives_the_tokens_of_the_same_weights(tmp_path, arch):
    config, model_cls, qtype, restored = ARCHITECTURES[arch]
    moe = arch in ("mixtral", "qwen3_moe")
    converted, reference = convert(tmp_path, config, model_cls, qtype, sharpen_experts if moe else None)
    assert_same_tokens(converted, reference)
    got, want = config_of(converted), config_of(reference)
    for key, value in want.items():  # the converted config states all the original does
        if key not in NOT_IN_GGUF:
            assert got.get(key) == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    for key, value in restored.items():  # among them, what transformers' reader alone would lose
        assert got[key] == value


@pytest.mark.parametrize("rope", [
    dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128),
], ids=["llama3", "linear", "yarn"])
def test_rope_scaling_survives_the_gguf(tmp_path, rope):
    """Llama 3.1 files carry their scaling only as a `rope_freqs` tensor, linear and YaRN as
    metadata. (Llama 3's scaling moves only low frequencies: at these prompt lengths it leaves the
    tokens as they are, so the config is what proves it.)"""
    config = tf.LlamaConfig(**LLAMA, rope_parameters=rope)
    converted, reference = convert(tmp_path, config, tf.LlamaForCausalLM, T.F32)
    assert config_of(converted)["rope_parameters"] == config_of(reference)["rope_parameters"]
    assert_same_tokens(converted, reference)


def test_the_converted_tokenizer_encodes_like_the_original(tmp_path):
    from transformers import AutoTokenizer

    converted, reference = convert(tmp_path, tf.LlamaConfig(**LLAMA), tf.LlamaForCausalLM, T.F32)
    ours, original = AutoTokenizer.from_pretrained(converted), AutoTokenizer.from_pretrained(reference)
    for text in ["The quick brown fox jumps over the lazy dog.", "Unicode: café, 日本語 and </s> too",
                 "  spaces,\nnew lines\tand tabs 0123456789"]:
        assert ours(text).input_ids == original(text).input_ids
        assert ours.decode(ours(text).input_ids) == text
    assert (ours.eos_token, ours.bos_token) == (original.eos_token, original.bos_token)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(messages, tokenize=False)


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    src = build(str(tmp_path / "src"), tf.LlamaConfig(**LLAMA), tf.LlamaForCausalLM)
    write_gguf(str(tmp_path / "m.gguf"), src, arch="rwkv6")
    with pytest.raises(UnsupportedGGUF, match="architecture 'rwkv6' is not supported.*llama"):
        locate_model(ModelConfig(model_id=str(tmp_path / "m.gguf"), cache_dir=str(tmp_path / "cache")))
    assert not os.path.exists(tmp_path / "cache" / "models" / "m")


def test_an_unreadable_tensor_type_is_refused_by_name(tmp_path):
    """Q8_K is a type ggml computes with but gguf-py cannot read back."""
    path = str(tmp_path / "m.gguf")
    w = GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 292), dtype=np.uint8), raw_dtype=T.Q8_K)  # 4 rows of 256
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGGUF, match="Q8_K cannot be dequantized"):
        locate_model(ModelConfig(model_id=path, cache_dir=str(tmp_path / "cache")))


def test_a_gguf_that_does_not_fill_the_model_is_refused(tmp_path):
    src = build(str(tmp_path / "src"), tf.LlamaConfig(**LLAMA), tf.LlamaForCausalLM)
    write_gguf(str(tmp_path / "m.gguf"), src, drop=("model.layers.1.mlp.down_proj.weight",))
    with pytest.raises(UnsupportedGGUF, match="missing 1 tensors.*layers.1.mlp.down_proj"):
        locate_model(ModelConfig(model_id=str(tmp_path / "m.gguf"), cache_dir=str(tmp_path / "cache")))
