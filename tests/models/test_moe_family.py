"""Mixtral and Qwen3-MoE (softmax weights kept as they are, a dense layer among sparse ones, q/k
norm) against transformers' greedy output; experts stored stacked load alike; a missing expert fails."""

from __future__ import annotations

import os

import pytest
import torch

from models.families import build, check_greedy, CPU, family_fixture, serve_and_check
from tgserve.weights.loader import CheckpointMismatch, load_model

TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0,
            num_experts_per_tok=2)


def sharpen_experts(folder: str) -> str:
    """transformers' router init (std 0.02) routes almost uniformly and its experts add little to
    the residual stream: scaled up, a wrong expert, weight or routing rule changes the tokens."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    for key, t in tensors.items():
        if key.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
            tensors[key] = t * 40
        elif ".experts." in key:
            tensors[key] = t * 4
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def mixtral(folder):
    from transformers import MixtralConfig, MixtralForCausalLM

    return sharpen_experts(build(folder, MixtralConfig(**TINY, num_local_experts=8), MixtralForCausalLM))


def qwen3_moe(folder):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**TINY, head_dim=32, num_experts=6, moe_intermediate_size=48, norm_topk_prob=False,
                            mlp_only_layers=[1])
    return sharpen_experts(build(folder, config, Qwen3MoeForCausalLM))


FAMILIES = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}


family = family_fixture(FAMILIES)


def test_greedy_equals_transformers_alone_and_batched(family):
    _, folder = family
    check_greedy(folder)


def test_checkpoint_names_experts_one_by_one(family):
    from safetensors.torch import load_file

    name, folder = family
    keys = load_file(os.path.join(folder, "model.safetensors")).keys()
    expert = "block_sparse_moe.experts.5.w2.weight" if name == "mixtral" else "mlp.experts.5.down_proj.weight"
    assert f"model.layers.0.{expert}" in keys
    if name == "qwen3_moe":  # the dense layer keeps a dense MLP
        assert "model.layers.1.mlp.gate_proj.weight" in keys and "model.layers.1.mlp.gate.weight" not in keys


def _rewrite(folder: str, dest: str, change) -> str:
    """A copy of `folder` whose tensors are `change(tensors)`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    path = os.path.join(dest, "model.safetensors")
    save_file(change(load_file(path)), path, metadata={"format": "pt"})
    return dest


def _stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory layout: experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I]."""
    spell = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    out, experts = {}, {}
    for key, t in tensors.items():
        if ".experts." not in key:
            out[key] = t
            continue
        prefix, rest = key.replace(".block_sparse_moe.", ".mlp.").split(".experts.")
        e, proj, _ = rest.split(".")
        experts.setdefault(prefix, {})[(int(e), spell.get(proj, proj))] = t
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n)])
        out[f"{prefix}.experts.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
    return out


def test_stacked_experts_load_the_same_parameters(family, tmp_path):
    _, folder = family
    stacked = _rewrite(folder, str(tmp_path / "stacked"), _stack_experts)
    ours = load_model(folder, torch.float32, CPU, 64)[0].state_dict()
    theirs = load_model(stacked, torch.float32, CPU, 64)[0].state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_missing_expert_fails_loading(family, tmp_path):
    _, folder = family
    missing = _rewrite(folder, str(tmp_path / "missing"),
                       lambda t: {k: v for k, v in t.items() if ".experts.3.w3." not in k and ".experts.3.up_proj." not in k})
    with pytest.raises(CheckpointMismatch, match="experts_gate_up"):
        load_model(missing, torch.float32, CPU, 64)


@pytest.mark.slow
def test_served_through_tgserve(family, server_factory):
    _, folder = family
    serve_and_check(server_factory, folder)
