"""Every weight format gives the same tokens: single-file and sharded safetensors, and PyTorch
.bin checkpoints (single and sharded) converted once by `tgserve convert` or on first serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.families import build, engine_greedy, prompts

TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0)


def save_as(folder: str, source: str, **kwargs) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    model.save_pretrained(folder, **kwargs)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            with open(os.path.join(source, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
                dst.write(src.read())
    return folder


def save_bin(folder: str, source: str, shards: int = 1) -> str:
    """A PyTorch pickle checkpoint as older models ship it (transformers 5 only writes safetensors):
    tied tensors share storage, as torch.save keeps them."""
    import torch
    from transformers import AutoModelForCausalLM

    save_as(folder, source)
    for name in os.listdir(folder):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(folder, name))
    state = AutoModelForCausalLM.from_pretrained(source).state_dict()
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return folder
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def reference(request, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = str(tmp_path_factory.mktemp("reference"))
    build(folder, LlamaConfig(**TINY, tie_word_embeddings=request.param), LlamaForCausalLM, seed=4)
    batch = prompts(400, [5, 21, 40], seed=3)
    return folder, batch, engine_greedy(folder, batch, 8, 256, together=True)


def test_sharded_safetensors_give_the_same_tokens(reference, tmp_path):
    folder, batch, expected = reference
    sharded = save_as(str(tmp_path / "sharded"), folder, max_shard_size="60KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    assert engine_greedy(sharded, batch, 8, 256, together=True) == expected


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
def test_bin_checkpoints_convert_once_and_give_the_same_tokens(reference, tmp_path, shards):
    folder, batch, expected = reference
    bins = save_bin(str(tmp_path / "bin"), folder, shards)
    assert not any(n.endswith(".safetensors") for n in os.listdir(bins))
    out = subprocess.run([sys.executable, "-m", "tgserve", "convert", "--model-id", bins],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == bins
    assert any(n.endswith(".safetensors") for n in os.listdir(bins))
    assert engine_greedy(bins, batch, 8, 256, together=True) == expected
    stamp = os.path.getmtime(os.path.join(bins, sorted(n for n in os.listdir(bins) if n.endswith(".safetensors"))[0]))
    again = subprocess.run([sys.executable, "-m", "tgserve", "convert", "--model-id", bins], capture_output=True, text=True)
    assert again.returncode == 0
    assert os.path.getmtime(os.path.join(bins, sorted(n for n in os.listdir(bins)
                                                      if n.endswith(".safetensors"))[0])) == stamp  # once


def test_a_missing_tensor_is_an_error_naming_it(reference, tmp_path):
    from safetensors.torch import load_file, save_file

    from tgserve.weights.loader import CheckpointMismatch, load_model

    folder, _, _ = reference
    broken = save_as(str(tmp_path / "broken"), folder)
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    import torch

    with pytest.raises(CheckpointMismatch, match="model.layers.1.mlp.down_proj.weight"):
        load_model(broken, torch.float32, torch.device("cpu"), 256)


def test_a_misshaped_tensor_is_an_error_naming_it(reference, tmp_path):
    from safetensors.torch import load_file, save_file

    import torch

    from tgserve.weights.loader import load_model

    folder, _, _ = reference
    broken = save_as(str(tmp_path / "misshaped"), folder)
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :10].contiguous()
    save_file(tensors, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight"):
        load_model(broken, torch.float32, torch.device("cpu"), 256)


def test_an_unexpected_tensor_is_an_error_naming_it(reference, tmp_path):
    from safetensors.torch import load_file, save_file

    import torch

    from tgserve.weights.loader import CheckpointMismatch, load_model

    folder, _, _ = reference
    extra = save_as(str(tmp_path / "extra"), folder)
    tensors = load_file(os.path.join(extra, "model.safetensors"))
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2, 2)
    save_file(tensors, os.path.join(extra, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match="model.layers.0.mlp.surprise.weight"):
        load_model(extra, torch.float32, torch.device("cpu"), 256)
