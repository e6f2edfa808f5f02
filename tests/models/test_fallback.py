"""The transformers fallback: an architecture with no native implementation (GPT-J, Falcon) is
served with continuous batching through transformers, greedy tokens equal to transformers' own
generate alone and in a batch whose members join and leave; /info names the path."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import TINY_SERVER_ARGS
from models.families import CPU, build, check_served, prompts, transformers_greedy

TINY = dict(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8, eos_token_id=0,
            bos_token_id=1, tie_word_embeddings=False)


def gptj(folder):
    from transformers import GPTJConfig, GPTJForCausalLM

    return build(folder, GPTJConfig(**TINY), GPTJForCausalLM)


def falcon(folder):
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=512, eos_token_id=0, bos_token_id=1, new_decoder_architecture=False,
                          multi_query=True, parallel_attn=True, bias=False, alibi=False)
    return build(folder, config, FalconForCausalLM)


ARCHITECTURES = {"gptj": gptj, "falcon": falcon}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request, tmp_path_factory):
    return request.param, ARCHITECTURES[request.param](str(tmp_path_factory.mktemp(request.param)))


def fallback_greedy(folder: str, batch: list[list[int]], n: int, budget: int, stagger: bool) -> list[list[int]]:
    """Our engine on the fallback runner. `stagger`: requests arrive while others run, so the batch
    grows and shrinks (joins are left-padded appends, ends are filters)."""
    from transformers import AutoConfig

    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.fallback import FallbackRunner
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.scheduler import Scheduler
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest
    from tgserve.sampling.sampler import Sampler

    vocab = AutoConfig.from_pretrained(folder).vocab_size
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget), KVCacheManager(256, 16), 512)
    engine = EngineCore(scheduler, FallbackRunner(folder, torch.float32, CPU, Sampler(vocab, CPU)))
    tokens: dict[str, list[int]] = {}
    for i, p in enumerate(batch):
        # request i wants a different length, so the batch also loses members while others go on
        scheduler.add(AddRequest(str(i), p, SamplingParams(), StoppingParams(max_new_tokens=n - i, ignore_eos=True), 0.0))
        steps = 3 if stagger else 0
        while scheduler.has_work() and steps:
            for o in engine.step().outputs:
                assert o.error is None, o.error
                tokens.setdefault(o.request_id, []).extend(o.token_ids)
            steps -= 1
    while scheduler.has_work():
        for o in engine.step().outputs:
            assert o.error is None, o.error
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    return [tokens[str(i)] for i in range(len(batch))]


def test_fallback_greedy_equals_transformers_alone_and_batched(model):
    name, folder = model
    batch = prompts(400, [3, 20, 45, 9], seed=2)
    n = 12
    expected = [tokens[:n - i] for i, tokens in enumerate(transformers_greedy(folder, batch, n))]
    for budget, stagger in ((512, False), (16, True)):
        got = fallback_greedy(folder, batch, n, budget, stagger)
        assert got == expected, f"budget {budget}, stagger {stagger}"


def test_native_architectures_do_not_take_the_fallback(tmp_path):
    from tgserve.engine import fallback
    from tgserve.models.registry import model_class
    from transformers import AutoConfig, LlamaConfig

    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    assert model_class(AutoConfig.from_pretrained(tmp_path)).__name__ == "LlamaForCausalLM"
    assert fallback.supports(AutoConfig.from_pretrained(tmp_path))  # it could, but native comes first


@pytest.mark.slow
def test_served_through_tgserve_and_info_names_the_path(model, server_factory):
    name, folder = model
    server = server_factory(folder, *TINY_SERVER_ARGS)
    try:
        assert httpx.get(server.url + "/info").json()["model_implementation"] == "transformers"
        assert "transformers fallback serves" in server.logs()
        check_served(server, folder)
    finally:
        server.stop()
