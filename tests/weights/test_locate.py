"""Finding and reading models on local disk: the converted default model, HF cache repo ids,
sharded checkpoints, and clear errors for what is not there."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tgserve.config import ModelConfig
from tgserve.weights.loader import load_model
from tgserve.weights.locate import ModelNotFound, locate_model
from tgserve.weights.safetensors import safetensors_files


def test_default_model_is_converted_into_an_ordinary_hf_folder(smollm2_dir):
    names = set(os.listdir(smollm2_dir))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= names
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    with open(os.path.join(smollm2_dir, "tokenizer_config.json")) as f:
        assert "<|im_start|>" in json.load(f)["chat_template"]
    assert smollm2_dir.startswith(os.path.join(os.path.expanduser("~"), ".cache", "tgserve"))
    assert locate_model(ModelConfig()) == smollm2_dir  # converted once, then reused


def test_a_repo_id_is_found_in_the_local_hf_cache(tiny_llama_dir, tmp_path):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    found = locate_model(ModelConfig(model_id="acme/tiny-llama", huggingface_hub_cache=str(tmp_path / "hub")))
    assert os.path.samefile(found, snapshot)


def test_an_unknown_repo_id_lists_where_it_looked(tmp_path):
    with pytest.raises(ModelNotFound) as e:
        locate_model(ModelConfig(model_id="acme/missing", huggingface_hub_cache=str(tmp_path)))
    assert "acme/missing" in str(e.value) and "Hugging Face cache" in str(e.value)


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="no config.json and \\*.safetensors"):
        locate_model(ModelConfig(model_id=str(tmp_path)))


def test_a_sharded_checkpoint_loads_like_a_single_file(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert len(safetensors_files(sharded)) > 1
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    single, _ = load_model(tiny_llama_dir, torch.float32, torch.device("cpu"), 512)
    many, _ = load_model(sharded, torch.float32, torch.device("cpu"), 512)
    for (name, a), (_, b) in zip(single.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_missing_tensors_is_refused(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from tgserve.weights.loader import CheckpointMismatch

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match="qkv_proj"):
        load_model(str(broken), torch.float32, torch.device("cpu"), 512)
