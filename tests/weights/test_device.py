"""A model loaded for a device other than the CPU keeps weights that device can use: the CPU's
oneDNN repacking (quant/base.py) must not be applied before the model moves. `meta` stands in
for CUDA here (no GPU on the test machines): any non-CPU device shows the mistake, since a
CPU-packed weight cannot multiply activations on another device."""

from __future__ import annotations

import pytest
import torch

from tgserve.layers.linear import LinearBase
from tgserve.weights.loader import load_model

from conftest import build_tiny_llama


def test_a_model_loaded_for_another_device_computes_there(tmp_path):
    folder = build_tiny_llama(str(tmp_path / "model"))
    model, _ = load_model(folder, torch.float32, torch.device("meta"), 128)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert linears
    for layer in linears:
        assert getattr(layer, "packed_weight", None) is None
        assert layer.weight.device.type == "meta"
        y = layer(torch.zeros(3, layer.in_features, device="meta"))
        assert y.device.type == "meta"


def test_on_the_cpu_the_linears_are_packed_for_onednn(tmp_path):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    folder = build_tiny_llama(str(tmp_path / "model"))
    model, _ = load_model(folder, torch.float32, torch.device("cpu"), 128)
    assert all(getattr(m, "packed_weight", None) is not None for m in model.modules() if isinstance(m, LinearBase))
