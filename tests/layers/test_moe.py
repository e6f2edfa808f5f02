"""The mixture-of-experts layer against a direct per-token computation, under both routing rules;
its checkpoint spellings; its per-expert fallback; and its tensor-parallel split (tp=2 over gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from tgserve import distributed
from conftest import run_ranks
from tgserve.layers.moe import (FusedMoE, expert_packed_modules, expert_tensors, grouped_matmul,
                                matmul_per_expert, route)

HIDDEN, INTER, EXPERTS = 32, 48, 8


def expert_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Router [E, H] (sharp enough that routing decides the output) and each expert's gate / up /
    down, as a checkpoint names them one by one."""
    g = torch.Generator().manual_seed(seed)
    w = {"router": torch.randn(EXPERTS, HIDDEN, generator=g)}
    for e in range(EXPERTS):
        w[f"gate{e}"] = torch.randn(INTER, HIDDEN, generator=g) / HIDDEN**0.5
        w[f"up{e}"] = torch.randn(INTER, HIDDEN, generator=g) / HIDDEN**0.5
        w[f"down{e}"] = torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5
    return w


def build_moe(w: dict[str, torch.Tensor], top_k: int, renormalize: bool, pack: bool = True) -> FusedMoE:
    """Loaded through each parameter's weight_loader with the loader's shard ids, as load_weights does."""
    moe = FusedMoE(HIDDEN, INTER, EXPERTS, top_k, renormalize, torch.float32)
    moe.gate.weight.weight_loader(moe.gate.weight, w["router"])
    packed = expert_packed_modules(EXPERTS)
    for e in range(EXPERTS):
        for proj, key in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            fused, shard = packed[f"expert{e}_{proj}"]
            param = getattr(moe, fused).weight
            param.weight_loader(param, w[f"{key}{e}"], shard)
    if pack:
        moe.gate.quant.after_load(moe.gate)  # the oneDNN-packed router, as served
    return moe


def reference(w: dict[str, torch.Tensor], x: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """Token by token: softmax over all experts, top-k, optional renormalisation, weighted sum of
    the chosen experts' SiLU-gated MLPs."""
    out = []
    for t in x:
        probs = torch.softmax(F.linear(t, w["router"]), dim=-1)
        top, ids = probs.topk(top_k)
        if renormalize:
            top = top / top.sum()
        y = torch.zeros(HIDDEN)
        for p, e in zip(top.tolist(), ids.tolist()):
            h = F.silu(F.linear(t, w[f"gate{e}"])) * F.linear(t, w[f"up{e}"])
            y += p * F.linear(h, w[f"down{e}"])
        out.append(y)
    return torch.stack(out)


def test_route_softmax_over_all_experts_then_top_k():
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0], [0.0, 3.0, 0.1, 2.9]])
    probs = torch.softmax(logits, dim=-1)
    kept, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 2], [1, 3]]
    assert torch.allclose(kept, probs.gather(1, ids))  # Qwen3-MoE without norm_topk_prob
    renormed, ids2 = route(logits, 2, renormalize=True)
    assert torch.equal(ids, ids2)
    assert torch.allclose(renormed, kept / kept.sum(-1, keepdim=True))  # Mixtral
    assert torch.allclose(renormed.sum(-1), torch.ones(2))
    assert renormed.dtype == torch.float32 == route(logits.bfloat16(), 2, True)[0].dtype


@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalised", "softmax_weights"])
@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("tokens", [1, 29])
def test_fused_moe_equals_per_token_reference(renormalize, top_k, tokens):
    w = expert_weights()
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    moe = build_moe(w, top_k, renormalize)
    with torch.inference_mode():
        got = moe(x)
    used = route(F.linear(x, w["router"]), top_k, renormalize)[1].unique().numel()
    assert tokens == 1 or used == EXPERTS, "the mixed batch should reach every expert"
    assert torch.allclose(got, reference(w, x, top_k, renormalize), atol=1e-5, rtol=1e-5)


def test_experts_without_tokens_and_an_empty_step():
    moe = build_moe(expert_weights(), 2, True)
    with torch.inference_mode():
        assert moe(torch.empty(0, HIDDEN)).shape == (0, HIDDEN)
        x = torch.randn(2, HIDDEN)
        assert torch.allclose(moe(x), reference(expert_weights(), x, 2, True), atol=1e-5)


def test_per_expert_fallback_equals_grouped_matmul():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(EXPERTS, 24, HIDDEN, generator=g)
    counts = torch.tensor([3, 0, 5, 1, 0, 0, 7, 2])
    x = torch.randn(int(counts.sum()), HIDDEN, generator=g)
    expected = torch.cat([x[s:s + n] @ weight[e].T for e, (s, n) in
                          enumerate(zip((counts.cumsum(0) - counts).tolist(), counts.tolist()))])
    assert torch.allclose(grouped_matmul(x, weight, counts), expected, atol=1e-5)
    assert torch.allclose(matmul_per_expert(x, weight, counts), expected, atol=1e-5)


def test_every_checkpoint_spelling_becomes_one_tensor_per_expert_and_projection():
    w = expert_weights()
    per_expert = {}
    for e in range(EXPERTS):
        for proj, key in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            per_expert[f"model.layers.1.mlp.expert{e}_{proj}.weight"] = w[f"{key}{e}"]
    mixtral = {f"model.layers.1.mlp.experts.{e}.{name}.weight": w[f"{key}{e}"]
               for e in range(EXPERTS) for name, key in (("w1", "gate"), ("w3", "up"), ("w2", "down"))}
    qwen = {f"model.layers.1.mlp.experts.{e}.{proj}.weight": w[f"{key}{e}"]
            for e in range(EXPERTS) for proj, key in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))}
    stacked = {  # transformers 5's in-memory layout: [E, 2I, H] (gate | up) and [E, H, I]
        "model.layers.1.mlp.experts.gate_up_proj": torch.stack([torch.cat([w[f"gate{e}"], w[f"up{e}"]])
                                                                for e in range(EXPERTS)]),
        "model.layers.1.mlp.experts.down_proj": torch.stack([w[f"down{e}"] for e in range(EXPERTS)]),
    }
    for spelling in (mixtral, qwen, stacked):
        got = dict(pair for name, t in spelling.items() for pair in expert_tensors(name, t))
        assert got.keys() == per_expert.keys()
        assert all(torch.equal(got[k], per_expert[k]) for k in got)
    router = torch.zeros(EXPERTS, HIDDEN)
    assert expert_tensors("model.layers.1.mlp.gate.weight", router) == [("model.layers.1.mlp.gate.weight", router)]


# ---- tensor parallelism: two gloo ranks, each loading its shard from the full tensors -------------

TP = 2


def _tp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    distributed.init(rank, TP, "gloo")
    x = torch.randn(29, HIDDEN, generator=torch.Generator().manual_seed(7))
    results = {}
    for renormalize in (True, False):
        moe = build_moe(expert_weights(), 2, renormalize)
        assert moe.experts_gate_up.weight.shape == (EXPERTS, INTER, HIDDEN)  # 2 × INTER / TP
        with torch.inference_mode():
            results[renormalize] = moe(x)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


def test_tensor_parallel_split_of_the_intermediate_dim_equals_unsharded(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(_tp_worker, (port, str(tmp_path)), TP)
    x = torch.randn(29, HIDDEN, generator=torch.Generator().manual_seed(7))
    for rank in range(TP):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for renormalize, got in results.items():
            assert torch.allclose(got, reference(expert_weights(), x, 2, renormalize), atol=1e-5, rtol=1e-5)
