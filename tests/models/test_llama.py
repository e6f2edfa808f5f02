"""Greedy output of tgserve equals transformers' generate, token for token, on tiny random Llamas.

Checkpoints are saved to disk and loaded through the real loader (float32); the engine runs
in-process (EngineCore + Scheduler + ModelRunner, no server). The reference is
`model.generate(do_sample=False)` on the same folder, with EOS switched off as ignore_eos does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tgserve.config import SchedulerConfig
from tgserve.engine.core import EngineCore
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.runner import ModelRunner
from tgserve.engine.scheduler import Scheduler
from tgserve.models.registry import UnsupportedModel
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest, FinishReason
from tgserve.weights.loader import load_model

from conftest import build_tiny_llama

CPU = torch.device("cpu")
MAX_LEN = 256
NEW_TOKENS = 16
PROMPT_LENGTHS = [5, 17, 33, 1, 70, 9, 40, 3]


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


def build_tiny_mistral(folder: str, **overrides) -> str:
    from transformers import MistralConfig, MistralForCausalLM

    config = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    config.update(overrides)
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**config)).eval().save_pretrained(folder)
    return folder


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab_size, (n,), generator=g).tolist() for n in lengths]


def transformers_greedy(folder: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS is a token like any other
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    assert all(len(t) == n for t in out)
    return out


def run_engine(model, prompts, n=NEW_TOKENS, *, budget=64, num_blocks=64, block_size=16, one_at_a_time=False):
    """Greedy tokens per prompt, and per step the scheduled (context, new tokens) and preemptions.
    Every request must end by length without error, leaving the KV pool fully free."""
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget),
                          KVCacheManager(num_blocks, block_size), MAX_LEN)
    engine = EngineCore(scheduler, ModelRunner(model, num_blocks, block_size, torch.float32, CPU))
    steps = []
    schedule = scheduler.schedule

    def recording_schedule():
        plan = schedule()
        steps.append(([(s.seq.num_computed_tokens, s.num_tokens) for s in plan.scheduled], plan.preempted))
        return plan

    scheduler.schedule = recording_schedule
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, FinishReason] = {}

    def drain():
        while scheduler.has_work():
            for o in engine.step().outputs:
                assert o.error is None, o.error
                tokens.setdefault(o.request_id, []).extend(o.token_ids)
                if o.finish_reason is not None:
                    reasons[o.request_id] = o.finish_reason

    for i, p in enumerate(prompts):
        stopping = StoppingParams(max_new_tokens=n, ignore_eos=True)
        scheduler.add(AddRequest(str(i), p, SamplingParams(), stopping, 0.0))
        if one_at_a_time:
            drain()
    drain()
    assert reasons == {str(i): FinishReason.LENGTH for i in range(len(prompts))}
    assert scheduler.kv.num_free_blocks == scheduler.kv.pool.num_usable, "KV blocks leaked"
    return [tokens[str(i)] for i in range(len(prompts))], steps


def assert_same_tokens(got: list[list[int]], ref: list[list[int]]) -> None:
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g == r, f"prompt {i}: tgserve {g} != transformers {r}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama-sharp")))
    sharpen_checkpoint(folder)
    model, hf_config = load_model(folder, torch.float32, CPU, MAX_LEN)
    prompts = make_prompts(hf_config.vocab_size, PROMPT_LENGTHS)
    return model, prompts, transformers_greedy(folder, prompts, NEW_TOKENS)


def test_each_prompt_alone_matches_transformers_greedy(tiny):
    model, prompts, ref = tiny
    got, steps = run_engine(model, prompts, one_at_a_time=True)
    assert_same_tokens(got, ref)
    assert all(len(scheduled) == 1 for scheduled, _ in steps)  # really alone


def test_prompts_together_with_chunked_prefill_mixed_with_decodes_match_transformers_greedy(tiny):
    model, prompts, ref = tiny
    got, steps = run_engine(model, prompts, budget=64)
    assert_same_tokens(got, ref)
    scheduled = [s for s, _ in steps]
    assert any(ctx > 0 and new > 1 for step in scheduled for ctx, new in step), "no prefill was chunked"
    assert any({new == 1 for _, new in step} == {True, False} for step in scheduled), "no mixed step"
    assert not any(p for _, p in steps)


def test_tiny_kv_cache_preempts_and_recomputes_yet_matches_transformers_greedy(tiny):
    model, prompts, ref = tiny
    got, steps = run_engine(model, prompts, budget=64, num_blocks=12)
    assert_same_tokens(got, ref)
    assert any(p for _, p in steps), "the cache was large enough: nothing was preempted"


def test_engines_built_one_after_another_on_one_model_match_transformers_greedy(tiny):
    # each new runner rebinds fresh caches into the same model's attention layers; the freed
    # caches of the previous engine are the memory the next one is likely to get
    model, prompts, ref = tiny
    layer = model.attention_layers()[0]
    for num_blocks in (12, 64, 12, 24):
        # leave freed memory of this engine's cache size full of NaN, as a crashed step might
        poison = [torch.full((num_blocks, 16, layer.num_kv_heads, layer.head_dim), float("nan")) for _ in range(8)]
        del poison
        got, _ = run_engine(model, prompts, budget=48, num_blocks=num_blocks)
        assert_same_tokens(got, ref)


VARIANT_PROMPTS = [1, 9, 33, 70]
VARIANTS = {
    "attention_and_mlp_bias": dict(attention_bias=True, mlp_bias=True),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "head_dim_32_not_hidden_over_heads": dict(head_dim=32),
    "kv_heads_equal_heads": dict(num_key_value_heads=4),
    "single_kv_head": dict(num_key_value_heads=1),
    "linear_rope_scaling": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "mistral_no_sliding_window": dict(mistral=True, sliding_window=None),
    "mistral_window_covering_max_len": dict(mistral=True, sliding_window=MAX_LEN),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variant_matches_transformers_greedy(tmp_path, variant):
    overrides = dict(VARIANTS[variant])
    folder = str(tmp_path / variant)
    if overrides.pop("mistral", False):
        build_tiny_mistral(folder, **overrides)
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["architectures"] == ["MistralForCausalLM"]
    else:
        build_tiny_llama(folder, seed=1, **overrides)
    sharpen_checkpoint(folder)
    model, hf_config = load_model(folder, torch.float32, CPU, MAX_LEN)
    prompts = make_prompts(hf_config.vocab_size, VARIANT_PROMPTS, seed=2)
    ref = transformers_greedy(folder, prompts, 10)
    got, _ = run_engine(model, prompts, 10, budget=32)
    assert_same_tokens(got, ref)


def test_unknown_architecture_is_rejected_with_the_supported_list(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(architectures=["FalconForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel) as e:
        load_model(str(tmp_path), torch.float32, CPU, MAX_LEN)
    message = str(e.value)
    assert "FalconForCausalLM" in message and "not supported" in message
    assert "LlamaForCausalLM" in message and "MistralForCausalLM" in message
