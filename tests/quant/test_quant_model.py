"""A tiny random Llama served in-process with each --quantize method gives the same greedy tokens
as the same model whose linear weights are replaced by their dequantized values (in float32, the
activations rounded as the method rounds them: quant/reference.py): the quantized weights reach
the right layers, rows and fused parts, and nothing else of the model changes.

Not against the float model: 4-bit weights change a random model's tokens, which says nothing
about the code (bench/quantize.py measures how much they change a real model's)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tgserve.config import SchedulerConfig
from tgserve.engine.core import EngineCore
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.runner import ModelRunner
from tgserve.engine.scheduler import Scheduler
from tgserve.layers.linear import LinearBase
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest
from tgserve.weights.loader import load_model

from models.families import build, prompts
from quant.reference import METHODS, DequantizedReference, needs_package

CPU = torch.device("cpu")
MAX_LEN, BLOCK, BLOCKS = 128, 16, 48
NEW_TOKENS = 10
TIE = {torch.float32: 0.01, torch.bfloat16: 0.05}  # logprob gap of a near-tie
TOP_N = 5
LENGTHS = [1, 9, 33, 17]
TINY = dict(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    return build(str(tmp_path_factory.mktemp("quant-llama")), LlamaConfig(**TINY), LlamaForCausalLM)


def dequantized_copy(folder: str, method: str, quantized: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The unquantized model, each linear computing with the quantized one's dequantized weight."""
    reference, _ = load_model(folder, dtype, CPU, MAX_LEN)
    layers = dict(quantized.named_modules())
    for name, layer in reference.named_modules():
        if isinstance(layer, LinearBase):
            q = layers[name]
            layer.quant = DequantizedReference(method, q.quant.dequantize(q))
    return reference


def greedy(model: nn.Module, batch: list[list[int]], dtype: torch.dtype, new_tokens: list[int]):
    """All prompts at once in 32-token steps (chunked prefill mixed with decodes): each prompt's
    greedy tokens, and at each its best TOP_N (ids, logprobs)."""
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=32), KVCacheManager(BLOCKS, BLOCK), MAX_LEN)
    engine = EngineCore(scheduler, ModelRunner(model, BLOCKS, BLOCK, dtype, CPU))
    for i, (p, n) in enumerate(zip(batch, new_tokens)):
        scheduler.add(AddRequest(str(i), p, SamplingParams(top_n_tokens=TOP_N),
                                 StoppingParams(max_new_tokens=n, ignore_eos=True), 0.0))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
    best: dict[str, list] = {str(i): [] for i in range(len(batch))}
    while scheduler.has_work():
        for o in engine.step().outputs:
            assert o.error is None, o.error
            tokens[o.request_id].extend(o.token_ids)
            best[o.request_id].extend(zip(o.top_ids, o.top_logprobs))
    return [tokens[str(i)] for i in range(len(batch))], [best[str(i)] for i in range(len(batch))]


def assert_same_greedy(quantized: nn.Module, reference: nn.Module, batch: list[list[int]], dtype: torch.dtype,
                       label: str) -> None:
    """Token for token, except where the method took another of the reference's own best tokens
    within `TIE[dtype]` of its first (the kernels sum in another order; a bf16 logit's rounding
    step is ~0.03): from there the quantized model resumes on the reference's prefix."""
    expected, best = greedy(reference, batch, dtype, [NEW_TOKENS] * len(batch))
    start = [0] * len(batch)
    ties = []
    while any(s < NEW_TOKENS for s in start):
        rows = [i for i, s in enumerate(start) if s < NEW_TOKENS]
        got, _ = greedy(quantized, [batch[i] + expected[i][:start[i]] for i in rows], dtype,
                        [NEW_TOKENS - start[i] for i in rows])
        for i, g in zip(rows, got):
            tail = expected[i][start[i]:]
            j = next((j for j, (a, b) in enumerate(zip(g, tail)) if a != b), None)
            if j is None:
                start[i] = NEW_TOKENS
                continue
            k = start[i] + j
            ids, logprobs = best[i][k]
            near = {t: round(max(logprobs) - lp, 4) for t, lp in zip(ids, logprobs)}
            assert near.get(g[j], float("inf")) < TIE[dtype], (
                f"{label}: prompt {i} (length {len(batch[i])}) token {k}: {g[j]} where the dequantized reference "
                f"takes {expected[i][k]} (its best, with their distance to the first: {near}); "
                f"reference {expected[i]}")
            ties.append(near[g[j]])
            start[i] = k + 1
    assert len(ties) <= len(batch), f"{label}: {len(ties)} near-ties taken the other way ({ties})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_greedy_equals_dequantized_reference(llama_dir, method, dtype):
    needs_package(method)
    quantized, _ = load_model(llama_dir, dtype, CPU, MAX_LEN, quantize=method)
    linears = [m for m in quantized.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.weight is None for m in linears), "a float weight outlived its quantization"
    reference = dequantized_copy(llama_dir, method, quantized, dtype)
    assert_same_greedy(quantized, reference, prompts(TINY["vocab_size"], LENGTHS), dtype, method)
