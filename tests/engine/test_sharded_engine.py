"""The sharded engine for one tiny model of every native architecture: two gloo ranks in one
group, rank 0 scheduling (create_engine) and rank 1 following (create_follower + follow), exactly
as `tgserve serve --num-shard 2` runs them; a batch of mixed prompt lengths in 32-token steps
(chunked prefills beside decodes) gives transformers' greedy tokens in float32 — what one shard
gives (tests/models). Through the launcher and HTTP: tests/e2e/test_sharding.py."""

from __future__ import annotations

import json
import os
import traceback

import pytest

from conftest import free_port, run_ranks
from models.families import prompts, transformers_greedy

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
LENGTHS = [1, 9, 33, 70, 17]


def builders() -> dict[str, object]:
    """A tiny model per native architecture (tests/models' builders; Llama and BLOOM with head
    counts that split unevenly over two ranks)."""
    from models import test_bloom_gemma, test_gpt_family, test_llama_family, test_moe_family, test_t5

    return {
        "LlamaForCausalLM": test_llama_family.llama_3_groups, "MistralForCausalLM": test_llama_family.mistral,
        "Qwen2ForCausalLM": test_llama_family.qwen2, "Qwen3ForCausalLM": test_llama_family.qwen3,
        "Phi3ForCausalLM": test_llama_family.phi3, "GPT2LMHeadModel": test_gpt_family.gpt2,
        "OPTForCausalLM": test_gpt_family.opt_post_norm_projected, "GPTNeoXForCausalLM": test_gpt_family.neox_parallel,
        "BloomForCausalLM": test_bloom_gemma.bloom_post_ln_residual,  # 5 heads: ALiBi slopes split 3 + 2
        "Gemma2ForCausalLM": test_bloom_gemma.gemma2, "Gemma3ForCausalLM": test_bloom_gemma.gemma3,
        "MixtralForCausalLM": test_moe_family.mixtral, "Qwen3MoeForCausalLM": test_moe_family.qwen3_moe,
        "T5ForConditionalGeneration": test_t5.t5, "MT5ForConditionalGeneration": test_t5.mt5,
    }


def _config(folder: str, port: int):
    from tgserve.config import CacheConfig, Config, ModelConfig, SchedulerConfig, ServerConfig, ShardConfig

    return Config(model=ModelConfig(model_id=folder, path=folder, dtype="float32", device="cpu"),
                  cache=CacheConfig(max_batch_total_tokens=2048),
                  scheduler=SchedulerConfig(max_batch_prefill_tokens=32),
                  server=ServerConfig(max_input_tokens=255, max_total_tokens=256),
                  shard=ShardConfig(num_shard=2, master_port=port))


def _worker(rank: int, port: int, folders: dict[str, str], batches: dict[str, list[list[int]]], out: str) -> None:
    from tgserve import distributed
    from tgserve.engine.core import create_engine, create_follower, follow
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest

    try:
        distributed.init(rank, 2, "gloo", f"tcp://127.0.0.1:{port}")
        results = {}
        for name, folder in folders.items():
            config = _config(folder, port)
            if rank:
                follow(create_follower(config, rank))
                continue
            core, _ = create_engine(config)
            for i, p in enumerate(batches[name]):
                core.scheduler.add(AddRequest(str(i), p, SamplingParams(),
                                              StoppingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), 0.0))
            tokens: dict[str, list[int]] = {}
            while core.scheduler.has_work():
                for o in core.step().outputs:
                    assert o.error is None, o.error
                    tokens.setdefault(o.request_id, []).extend(o.token_ids)
            distributed.broadcast_object(None)  # rank 1 leaves follow() for the next model
            results[name] = [tokens[str(i)] for i in range(len(batches[name]))]
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        distributed.shutdown()
    except BaseException:
        traceback.print_exc()
        os._exit(1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(expected, got) per architecture, from one spawn of two ranks."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("sharded")
    folders = {name: build(str(root / name)) for name, build in builders().items()}
    batches = {name: prompts(AutoConfig.from_pretrained(f).vocab_size, LENGTHS) for name, f in folders.items()}
    out = str(root / "results.json")
    run_ranks(_worker, (free_port(), folders, batches, out), timeout=600)
    with open(out) as f:
        got = json.load(f)
    return {name: (transformers_greedy(folders[name], batches[name], NEW_TOKENS), got[name]) for name in folders}


def test_every_native_architecture_is_covered():
    from tgserve.models.registry import ARCHITECTURES

    assert set(ARCHITECTURES) == set(builders())


@pytest.mark.parametrize("name", list(builders()))
def test_two_ranks_give_the_greedy_tokens_of_one(sharded, name):
    expected, got = sharded[name]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"prompt {i} (length {LENGTHS[i]}): 2 ranks {g} != transformers {e}"
