"""GPT-2 (Conv1D weights, fused c_attn, learned positions, tied head), OPT pre-norm (125m style),
OPT post-norm with projected embeddings (350m style), Galactica (OPT with its config values: gelu,
its special tokens, an untied head), GPT-NeoX with parallel and sequential residuals (fused q/k/v per
head, partial rotary) against transformers' greedy output."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from models.families import build, check_greedy, family_fixture, serve_and_check

# max_position_embeddings covers the tiny server's --max-total-tokens 512
OPT_TINY = dict(vocab_size=400, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=512, word_embed_proj_dim=64)
NEOX_TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=512, eos_token_id=0, bos_token_id=1)


def gpt2(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=400, n_embd=64, n_layer=3, n_head=4, n_positions=512, eos_token_id=0,
                        bos_token_id=1)
    return build(folder, config, GPT2LMHeadModel)


def opt_pre_norm(folder):
    from transformers import OPTConfig, OPTForCausalLM

    return build(folder, OPTConfig(**OPT_TINY, do_layer_norm_before=True), OPTForCausalLM)


def opt_post_norm_projected(folder):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**{**OPT_TINY, "word_embed_proj_dim": 32}, do_layer_norm_before=False)
    return build(folder, config, OPTForCausalLM)


def galactica(folder):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**OPT_TINY, activation_function="gelu", do_layer_norm_before=True, bos_token_id=0,
                       pad_token_id=1, eos_token_id=2, attention_dropout=0.1, dropout=0.1, learned_embeddings=True,
                       scale_embeddings=False, tie_word_embeddings=False)
    return build(folder, config, OPTForCausalLM)


def neox_parallel(folder):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return build(folder, GPTNeoXConfig(**NEOX_TINY, use_parallel_residual=True), GPTNeoXForCausalLM)


def neox_sequential(folder):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = GPTNeoXConfig(**NEOX_TINY, use_parallel_residual=False, rope_parameters=rope, tie_word_embeddings=True)
    return build(folder, config, GPTNeoXForCausalLM)


FAMILIES = {"gpt2": gpt2, "opt": opt_pre_norm, "opt-350m": opt_post_norm_projected, "galactica": galactica,
            "neox-parallel": neox_parallel, "neox-sequential": neox_sequential}


family = family_fixture(FAMILIES)


def test_greedy_equals_transformers_alone_and_batched(family):
    _, folder = family
    check_greedy(folder)


def legacy_layout(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The same weights as older hub uploads lay them out: openai-community/gpt2 (the bare model, with
    causal-mask buffers), facebook/opt-* (the bare OPTModel), Pythia (mask and rotary buffers)."""
    out = dict(tensors)
    if name == "gpt2":
        out = {k.removeprefix("transformer."): t for k, t in tensors.items()}
        for i in range(3):
            out[f"h.{i}.attn.bias"] = torch.ones(1, 1, 512, 512).tril()
            out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    elif name == "opt":
        out = {k.removeprefix("model."): t for k, t in tensors.items()}
    elif name == "neox-parallel":
        for i in range(3):
            out[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 512, 512).tril().bool()
            out[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            out[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    else:
        return None
    return out


def test_older_checkpoint_layouts_load_the_same_weights(family, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from tgserve.weights.loader import load_model

    name, folder = family
    legacy = legacy_layout(name, load_file(os.path.join(folder, "model.safetensors")))
    if legacy is None:
        pytest.skip("no older layout")
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = dict(load_model(folder, torch.float32, torch.device("cpu"), 128)[0].named_parameters())
    caplog.clear()
    theirs = dict(load_model(str(tmp_path), torch.float32, torch.device("cpu"), 128)[0].named_parameters())
    assert "ignored" not in caplog.text
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_gpt2_refuses_attention_variants_it_does_not_implement():
    from transformers import GPT2Config

    from tgserve.models.gpt2 import GPT2LMHeadModel

    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        config = GPT2Config(vocab_size=400, n_embd=64, n_layer=1, n_head=4, **{flag: True})
        with pytest.raises(NotImplementedError, match=flag):
            GPT2LMHeadModel(config, torch.float32, 256)


@pytest.mark.slow
def test_served_through_tgserve(family, server_factory):
    _, folder = family
    serve_and_check(server_factory, folder)
