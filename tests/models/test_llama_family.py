"""Llama 3, Mistral (past its sliding window), Qwen2 / Qwen3 (sliding layers, q/k norm) and Phi-3
(fused checkpoint, partial rotary) against transformers' greedy output."""

from __future__ import annotations

import json
import os

import pytest

from models.families import build, check_greedy, family_fixture, serve_and_check

TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0)


def llama3(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    return build(folder, LlamaConfig(**TINY, rope_parameters=rope), LlamaForCausalLM)


def mistral(folder):
    from transformers import MistralConfig, MistralForCausalLM

    return build(folder, MistralConfig(**TINY, sliding_window=24, head_dim=16), MistralForCausalLM)


def qwen2(folder):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**TINY, "num_hidden_layers": 4}, use_sliding_window=True, sliding_window=20,
                         max_window_layers=2)
    return build(folder, config, Qwen2ForCausalLM)


def qwen3(folder):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**TINY, "num_hidden_layers": 4}, head_dim=32, use_sliding_window=True, sliding_window=20,
                         max_window_layers=2)
    return build(folder, config, Qwen3ForCausalLM)


def phi3(folder):
    from transformers import Phi3Config, Phi3ForCausalLM

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return build(folder, Phi3Config(**TINY, rope_parameters=rope, pad_token_id=1), Phi3ForCausalLM)


def llama_3_groups(folder):
    """SmolLM2's shape in small (6 heads in 3 KV groups): over two ranks, groups split 2 + 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3})
    return build(folder, config, LlamaForCausalLM)


FAMILIES = {"llama3": llama3, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3, "phi3": phi3}


family = family_fixture(FAMILIES)


def test_greedy_equals_transformers_alone_and_batched(family):
    name, folder = family
    check_greedy(folder, n=16 if name == "mistral" else 12)


def test_mistral_generates_past_its_window(family):
    name, folder = family
    if name != "mistral":
        pytest.skip("Mistral only")
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["sliding_window"] == 24
    check_greedy(folder, n=40, lengths=[60, 5, 30])  # 60 + 40 tokens: well past a 24-token window


@pytest.mark.slow
def test_served_through_tgserve(family, server_factory):
    _, folder = family
    serve_and_check(server_factory, folder)


def test_three_kv_groups_the_sharding_tests_split_unevenly(tmp_path):
    check_greedy(llama_3_groups(str(tmp_path / "model")))
