"""`tgserve serve --quantize …` on a tiny Llama: the engine reports the weight memory it holds, and
the served greedy tokens are the in-process quantized engine's (the same method, kernels and
single-row batches: tests/quant compares those against each method's dequantized reference);
with --num-shard 2 each rank holds about half and quantizes its own slices."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from conftest import TINY_SERVER_ARGS

pytestmark = pytest.mark.slow

TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog."]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def quant_llama_dir(tmp_path_factory) -> str:
    """Linears wide enough for every kernel: input features in multiples of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_tokenizer
    from models.families import build

    folder = str(tmp_path_factory.mktemp("quant-serve"))
    build_tiny_tokenizer(folder)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(folder))
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return build(folder, config, LlamaForCausalLM)


def in_process(folder: str, method: str | None) -> tuple[list[list[int]], float]:
    """Each text alone through the engine (float32 model, `method` linears): greedy tokens, and the
    weight MiB the model holds."""
    from transformers import AutoTokenizer

    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.runner import ModelRunner, weight_bytes
    from tgserve.engine.scheduler import Scheduler
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest
    from tgserve.weights.loader import load_model

    model, _ = load_model(folder, torch.float32, torch.device("cpu"), 512, method)
    mib = weight_bytes(model) / 2**20
    tok = AutoTokenizer.from_pretrained(folder)
    engine = EngineCore(Scheduler(SchedulerConfig(max_batch_prefill_tokens=128), KVCacheManager(64, 16), 512),
                        ModelRunner(model, 64, 16, torch.float32, torch.device("cpu")))
    out = []
    for i, text in enumerate(TEXTS):
        engine.scheduler.add(AddRequest(str(i), tok(text).input_ids, SamplingParams(),
                                        StoppingParams(NEW_TOKENS, ignore_eos=True), 0.0))
        tokens = []
        while engine.scheduler.has_work():
            for o in engine.step().outputs:
                tokens += o.token_ids
        out.append(tokens)
    return out, mib


def served(server, near_ties: list | None = None) -> list[list[int]]:
    """Each text's greedy tokens, one request at a time (single-row batches, as in_process runs
    them); `near_ties` gets each step's two best (id, logprob) pairs."""
    out = []
    for text in TEXTS:
        r = httpx.post(server.url + "/generate", timeout=120, json={"inputs": text, "parameters": {
            "max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos_token": True, "top_n_tokens": 2}})
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        out.append([t["id"] for t in details["tokens"]])
        if near_ties is not None:
            near_ties.append([{t["id"]: t["logprob"] for t in step} for step in details["top_tokens"]])
    return out


def logged_weights(logs: str) -> list[float]:
    return [float(m) for m in re.findall(r"weights: ([\d.]+) MiB", logs)]


@pytest.mark.parametrize("method", ["int4", "int8", "bitsandbytes-nf4"])
def test_served_quantized_tokens_and_weight_memory(quant_llama_dir, server_factory, method):
    if method.startswith("bitsandbytes"):
        pytest.importorskip("bitsandbytes")
    expected, mib = in_process(quant_llama_dir, method)
    _, float_mib = in_process(quant_llama_dir, None)
    server = server_factory(quant_llama_dir, *TINY_SERVER_ARGS, "--quantize", method)
    try:
        assert served(server) == expected
        assert logged_weights(server.logs()) == [pytest.approx(mib, abs=0.05)]
        assert mib < 0.6 * float_mib  # the embedding and LM head stay float32
    finally:
        server.stop()


def test_two_shards_quantize_their_own_halves(quant_llama_dir, server_factory):
    _, mib = in_process(quant_llama_dir, "int4")
    server = server_factory(quant_llama_dir, *TINY_SERVER_ARGS, "--quantize", "int4", "--num-shard", "2")
    try:
        per_rank = logged_weights(server.logs())
        assert len(per_rank) == 2 and all(0.4 * mib < w < 0.6 * mib for w in per_rank), (per_rank, mib)
        expected, _ = in_process(quant_llama_dir, "int4")
        best: list = []
        for i, (got, want) in enumerate(zip(served(server, best), expected)):
            # the same tokens; or, where the halves' sums round differently, another of a near-tie
            k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
            if k is not None:
                top = best[i][k]
                assert want[k] in top and top[got[k]] - top[want[k]] < 0.05, (i, k, got, want, top)
    finally:
        server.stop()
