"""Tensor parallelism at world size 2 over gloo equals the unsharded computation.

One spawn of two ranks runs every check (layers built from full sizes and loaded from full tensors
through their weight_loader, with and without the oneDNN repack of `after_load`, then whole tiny
Llamas, two of them quantized while loading); rank 0 saves its results and each test below reads one of them. The references are plain
F.linear / F.embedding on the full weights, and the tp=1 model run in this process.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.nn.functional as F

from tgserve import distributed
from tgserve.config import SchedulerConfig
from tgserve.engine.core import EngineCore
from tgserve.engine.inputs import build_inputs
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.runner import ModelRunner
from tgserve.engine.scheduler import Scheduler
from tgserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgserve.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                   RowParallelLinear)
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest
from tgserve.weights.loader import load_model

from conftest import build_tiny_llama, run_ranks

TP = 2
CPU = torch.device("cpu")
PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 11, 64], [8], [300] + list(range(1, 18))]
NEW_TOKENS = 8
MODELS = {  # name → build_tiny_llama overrides
    "llama_gqa": {},
    "llama_kv1_odd_vocab_biases_tied": dict(num_key_value_heads=1, vocab_size=401, attention_bias=True,
                                            mlp_bias=True, tie_word_embeddings=True),
}
# sharding and --quantize together: each rank quantizes its own slices while loading. int4's groups
# of 32 input features never straddle a rank's slice here (hidden 128, MLP 256), so both ranks hold
# exactly the rows and groups one shard holds; int8's per-row scale is taken over a row-parallel
# rank's half of the row, so its weights differ slightly from one shard's (the tolerance says how much)
QUANTIZED = {"llama_int4": ("int4", 1e-6), "llama_int8": ("int8", 0.05)}  # name → (method, weight tolerance)
QUANT_SIZES = dict(hidden_size=128, intermediate_size=256)


def sharpen_checkpoint(folder: str) -> None:
    """transformers initialises biases to 0, norms to 1 and q/k so small that attention is almost
    uniform: bugs in bias or norm loading, positions or masking would barely move the logits."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    g = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if name.endswith(".bias") or "norm" in name:
            t = t + 0.1 * torch.randn(t.shape, generator=g)
        if ".q_proj." in name or ".k_proj." in name:
            t = t * 8
        tensors[name] = t
    save_file(tensors, path, metadata={"format": "pt"})


def _load(layer, pack: bool, *tensors) -> None:
    """Each (param name, full tensor, shard id) through the parameter's own weight_loader."""
    for name, full, shard in tensors:
        param = getattr(layer, name)
        param.weight_loader(param, full, shard)
    if pack:
        layer.quant.after_load(layer)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def _layer_checks(pack: bool) -> dict[str, float]:
    """Max abs error of each layer against the full computation (same seed on every rank)."""
    g = torch.Generator().manual_seed(0)
    r = distributed.tp_rank()
    x = torch.randn(5, 16, generator=g)
    res = {}

    w, b = torch.randn(12, 16, generator=g), torch.randn(12, generator=g)
    col = ColumnParallelLinear(16, 12, bias=True)
    _load(col, pack, ("weight", w, None), ("bias", b, None))
    res["column"] = _err(distributed.all_gather(col(x)), F.linear(x, w, b))

    w, b = torch.randn(10, 16, generator=g), torch.randn(10, generator=g)
    row = RowParallelLinear(16, 10, bias=True)
    _load(row, pack, ("weight", w, None), ("bias", b, None))
    res["row"] = _err(row(x.chunk(TP, dim=1)[r].contiguous()), F.linear(x, w, b))

    wg, wu, bg, bu = (torch.randn(12, 16, generator=g), torch.randn(20, 16, generator=g),
                      torch.randn(12, generator=g), torch.randn(20, generator=g))
    merged = MergedColumnParallelLinear(16, [12, 20], bias=True)
    _load(merged, pack, ("weight", wg, 0), ("weight", wu, 1), ("bias", bg, 0), ("bias", bu, 1))
    parts = distributed.all_gather(merged(x)).split([6, 10] * TP, dim=-1)  # [g0 u0 | g1 u1]
    res["merged"] = max(_err(torch.cat(parts[0::2], -1), F.linear(x, wg, bg)),
                        _err(torch.cat(parts[1::2], -1), F.linear(x, wu, bu)))

    for kv in (2, 1):  # kv heads >= tp: split; kv heads < tp: replicated
        d, heads = 4, 4
        wq, wk, wv = (torch.randn(heads * d, 16, generator=g), torch.randn(kv * d, 16, generator=g),
                      torch.randn(kv * d, 16, generator=g))
        bq, bk, bv = (torch.randn(heads * d, generator=g), torch.randn(kv * d, generator=g),
                      torch.randn(kv * d, generator=g))
        qkv = QKVParallelLinear(16, d, heads, kv, bias=True)
        _load(qkv, pack, ("weight", wq, "q"), ("weight", wk, "k"), ("weight", wv, "v"),
              ("bias", bq, "q"), ("bias", bk, "k"), ("bias", bv, "v"))
        q, k, v = qkv(x).split([qkv.num_heads * d, qkv.num_kv_heads * d, qkv.num_kv_heads * d], dim=-1)
        err = _err(distributed.all_gather(q), F.linear(x, wq, bq))
        # each local query head must pair with the kv head that the full model's GQA pairs it with
        kq, vq = F.linear(x, wk, bk).view(5, kv, d), F.linear(x, wv, bv).view(5, kv, d)
        for j in range(qkv.num_heads):
            head = r * qkv.num_heads + j
            local_kv = j // (qkv.num_heads // qkv.num_kv_heads)
            err = max(err, _err(k.view(5, -1, d)[:, local_kv], kq[:, head // (heads // kv)]),
                      _err(v.view(5, -1, d)[:, local_kv], vq[:, head // (heads // kv)]))
        res[f"qkv_kv{kv}"] = err

    for vocab in (10, 11):
        w = torch.randn(vocab, 16, generator=g)
        ids = torch.tensor([0, vocab - 1, 4, 5, vocab // 2, 3, vocab - 2, 1])  # rows of both ranks
        emb = VocabParallelEmbedding(vocab, 16)
        emb.weight.weight_loader(emb.weight, w)
        res[f"embedding_v{vocab}"] = _err(emb(ids), F.embedding(ids, w))
        head = ParallelLMHead(vocab, 16)
        _load(head, pack, ("weight", w, None))
        res[f"lm_head_v{vocab}"] = _err(head(x), F.linear(x, w))
        tied = ParallelLMHead(vocab, 16)
        tied.tie(emb)
        if pack:
            tied.quant.after_load(tied)
        res[f"lm_head_tied_v{vocab}"] = _err(tied(x), F.linear(x, w))
    return res


def model_outputs(folder: str, quantize: str | None = None) -> dict[str, object]:
    """Logits of a first step (a one-token prompt, a whole prompt, a chunk of a third), then greedy
    tokens of a whole engine run with chunked prefill, at this process's tensor-parallel size."""
    model, _ = load_model(folder, torch.float32, CPU, 128, quantize)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=16), KVCacheManager(32, 4), 128)
    ModelRunner(model, 32, 4, torch.float32, CPU)
    for i, p in enumerate(PROMPTS):
        scheduler.add(AddRequest(str(i), p, SamplingParams(), StoppingParams(max_new_tokens=1), 0.0))
    plan = scheduler.schedule()  # the budget chunks the last prompt
    inputs = build_inputs(plan, 4, CPU)
    with torch.inference_mode():
        hidden = model(inputs.input_ids, inputs.positions, inputs.attn)
        logits = model.compute_logits(hidden.index_select(0, inputs.sample_indices))

    engine = EngineCore(Scheduler(SchedulerConfig(max_batch_prefill_tokens=16), KVCacheManager(32, 4), 128),
                        ModelRunner(model, 32, 4, torch.float32, CPU))
    for i, p in enumerate(PROMPTS):
        stopping = StoppingParams(NEW_TOKENS, ignore_eos=True)
        engine.scheduler.add(AddRequest(str(i), p, SamplingParams(top_n_tokens=2), stopping, 0.0))
    tokens: dict[str, list[int]] = {}
    best: dict[str, list] = {}
    while engine.scheduler.has_work():
        for o in engine.step().outputs:
            assert o.error is None, o.error
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
            best.setdefault(o.request_id, []).extend(zip(o.top_ids, o.top_logprobs))
    return {"logits": logits, "tokens": tokens, "best": best}


def _worker(rank: int, port: int, folders: dict[str, str], out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    distributed.init(rank, TP, "gloo")
    results: dict[str, object] = {}
    for pack in (False, True):
        for name, err in _layer_checks(pack).items():
            results[f"{name}{'_packed' if pack else ''}"] = err
    for name, folder in folders.items():
        try:
            results[name] = model_outputs(folder, QUANTIZED.get(name, (None,))[0])
        except Exception:  # every rank fails alike here (same inputs), so no rank is left waiting
            results[name] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    folders = {name: build_tiny_llama(str(root / name), **cfg) for name, cfg in MODELS.items()}
    folders.update({name: build_tiny_llama(str(root / name), **QUANT_SIZES) for name in QUANTIZED})
    for folder in folders.values():
        sharpen_checkpoint(folder)
    run_ranks(_worker, (_free_port(), folders, str(root)), TP)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(TP)]
    single = {name: model_outputs(folder, QUANTIZED.get(name, (None,))[0])  # tp = 1, this process
              for name, folder in folders.items()}
    return ranks, single


LINEAR_CHECKS = ["column", "row", "merged", "qkv_kv2", "qkv_kv1", "lm_head_v10", "lm_head_v11",
                 "lm_head_tied_v10", "lm_head_tied_v11"]
CHECKS = LINEAR_CHECKS + [f"{c}_packed" for c in LINEAR_CHECKS] + ["embedding_v10", "embedding_v11"]


@pytest.mark.parametrize("key", CHECKS)
def test_sharded_layer_at_tp2_equals_unsharded_computation(tp_results, key):
    ranks, _ = tp_results
    assert set(ranks[0]) >= set(CHECKS)
    for rank, results in enumerate(ranks):
        assert results[key] < 1e-5, f"rank {rank}: max abs error {results[key]}"


@pytest.mark.parametrize("model", list(MODELS))
def test_llama_forward_at_tp2_equals_tp1(tp_results, model):
    ranks, single = tp_results
    for rank, results in enumerate(ranks):
        got = results[model]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        torch.testing.assert_close(got["logits"], single[model]["logits"], rtol=1e-4, atol=1e-4)
        assert got["tokens"] == single[model]["tokens"]
    assert all(len(t) == NEW_TOKENS for t in single[model]["tokens"].values())


@pytest.mark.parametrize("model", list(QUANTIZED))
def test_quantized_llama_at_tp2_equals_tp1(tp_results, model):
    """Logits within what the method's own rounding allows (bf16 activations in its kernels: a
    logit of this sharpened model moves by a few hundredths when the sum runs in two halves), and
    the same greedy tokens up to a near-tie (then the one shard's other best token)."""
    ranks, single = tp_results
    method, tolerance = QUANTIZED[model]
    expected = single[model]["logits"]
    for rank, results in enumerate(ranks):
        got = results[model]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        scale = expected.abs().max().item()
        err = (got["logits"] - expected).abs().max().item()
        assert err < 0.02 * scale + tolerance * scale, f"rank {rank}: max logit error {err} (logits up to {scale})"
        for i, tokens in got["tokens"].items():  # equal, or apart from a near-tie on: then contexts differ
            want, best = single[model]["tokens"][i], single[model]["best"][i]
            k = next((k for k, (a, b) in enumerate(zip(tokens, want)) if a != b), None)
            if k is not None:
                near = {t: max(best[k][1]) - lp for t, lp in zip(*best[k])}
                assert near.get(tokens[k], 1.0) < 0.05, f"prompt {i} token {k}: {tokens} vs {want}; one shard's best {near}"
