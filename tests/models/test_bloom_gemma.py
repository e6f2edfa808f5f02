"""BLOOM (ALiBi, per-head fused q/k/v, embedding LayerNorm; both residual layouts; hub names with and
without the "transformer." prefix), Gemma 2 (four Gemma norms, scaled embeddings, soft-capped
attention and logits, sliding and full layers) and Gemma 3 (q/k norms, rope per layer type)
against transformers' greedy output and prompt logprobs; and each sharded over two ranks equal to one."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch

from models.families import (CPU, LENGTHS, build, check_greedy, engine_greedy, family_fixture, prompts,
                             serve_and_check)
from conftest import run_ranks

TINY = dict(vocab_size=400, hidden_size=64, eos_token_id=0, bos_token_id=1, pad_token_id=1)
# BLOOM's residual stream carries the LayerNorm'd embedding; with transformers' 0.02 init the tied
# head then just echoes the last token, whatever attention does: larger weights make every layer count
# (ALiBi has no position limit, and BLOOM configs name none: the engine's scheduler reads one)
BLOOM = dict(TINY, initializer_range=0.1, max_position_embeddings=512)
GEMMA = dict(TINY, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, query_pre_attn_scalar=24, sliding_window=16, max_position_embeddings=512)


def bloom(folder):
    from transformers import BloomConfig, BloomForCausalLM

    return build(folder, BloomConfig(**BLOOM, n_layer=3, n_head=4), BloomForCausalLM)


def bloom_post_ln_residual(folder):
    """The residual taken after the LayerNorm, and 5 heads (ALiBi's slopes past a power of two)."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(**{**BLOOM, "hidden_size": 80}, n_layer=2, n_head=5,
                         apply_residual_connection_post_layernorm=True)
    return build(folder, config, BloomForCausalLM)


def gemma2(folder):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # scores and logits of this tiny model are around ±1 and ±0.3: these caps bend them
    config = Gemma2Config(**GEMMA, attn_logit_softcapping=1.0, final_logit_softcapping=0.25)
    return build(folder, config, Gemma2ForCausalLM)


def gemma3(folder):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    layer_types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Gemma3TextConfig(**GEMMA, layer_types=layer_types, rope_parameters=rope)
    return build(folder, config, Gemma3ForCausalLM)


FAMILIES = {"bloom": bloom, "bloom_post_ln_residual": bloom_post_ln_residual, "gemma2": gemma2, "gemma3": gemma3}


family = family_fixture(FAMILIES)


def test_greedy_equals_transformers_alone_and_batched(family):
    name, folder = family
    check_greedy(folder, n=16 if name.startswith("gemma") else 12)  # Gemma: 70 + 16 tokens, far past the window


def test_gemma_embedding_scale_is_rounded_to_the_model_dtype():
    """sqrt(3584) (Gemma 2 9B) is 59.87, and 60 in bfloat16: transformers multiplies by the rounded one."""
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    from tgserve.models.gemma import GemmaModel, Gemma2ForCausalLM

    cfg = Gemma2Config(**{**GEMMA, "hidden_size": 3584, "num_hidden_layers": 0}, layer_types=[])
    theirs = Gemma2TextScaledWordEmbedding(400, 3584, 1, embed_scale=3584**0.5).to(torch.bfloat16)
    ours = GemmaModel(cfg, torch.bfloat16, 256, Gemma2ForCausalLM)
    ours.embed_tokens.weight.data.copy_(theirs.weight.data)
    ids = torch.arange(400)
    assert torch.equal(ours(ids, ids, None), theirs(ids))


def engine_prompt_logprobs(folder: str, prompt: list[int]) -> list[float]:
    from tgserve.config import SchedulerConfig
    from tgserve.engine.core import EngineCore
    from tgserve.engine.kv_cache import KVCacheManager
    from tgserve.engine.runner import ModelRunner
    from tgserve.engine.scheduler import Scheduler
    from tgserve.params import SamplingParams, StoppingParams
    from tgserve.protocol import AddRequest
    from tgserve.weights.loader import load_model

    model, _ = load_model(folder, torch.float32, CPU, 256)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=32), KVCacheManager(32, 16), 256)
    engine = EngineCore(scheduler, ModelRunner(model, 32, 16, torch.float32, CPU))
    scheduler.add(AddRequest("0", prompt, SamplingParams(prompt_logprobs=True),
                             StoppingParams(max_new_tokens=1, ignore_eos=True), 0.0))
    logprobs: list[float] = []
    while scheduler.has_work():
        for o in engine.step().outputs:
            assert o.error is None, o.error
            logprobs += o.prompt_logprobs
    return logprobs


def test_prompt_logprobs_equal_transformers(family):
    """Logits, not just their argmax: the final soft-cap (monotonic, so invisible to greedy tokens)
    and every layer's numbers, over a 70-token prompt computed in 32-token chunks."""
    from transformers import AutoModelForCausalLM

    name, folder = family
    prompt = prompts(400, [70])[0]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    expected = logits.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    got = torch.tensor(engine_prompt_logprobs(folder, prompt))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bloom_loads_hub_names_without_the_transformer_prefix(family, tmp_path):
    """bigscience/bloom-560m names `word_embeddings.weight`, `h.0.…`: the same weights load."""
    from safetensors.torch import load_file, save_file

    from tgserve.weights.loader import load_model

    name, folder = family
    if not name.startswith("bloom"):
        pytest.skip("BLOOM only")
    for file in os.listdir(folder):
        source = os.path.join(folder, file)
        if file.endswith(".safetensors"):
            tensors = {k.removeprefix("transformer."): v for k, v in load_file(source).items()}
            save_file(tensors, str(tmp_path / file), metadata={"format": "pt"})
        elif os.path.isfile(source):
            with open(source, "rb") as f, open(tmp_path / file, "wb") as g:
                g.write(f.read())
    assert not any(k.startswith("transformer.") for k in load_file(str(tmp_path / "model.safetensors")))
    ours = load_model(folder, torch.float32, CPU, 256)[0].state_dict()
    bare = load_model(str(tmp_path), torch.float32, CPU, 256)[0].state_dict()
    assert ours.keys() == bare.keys()
    for key in ours:
        assert torch.equal(ours[key], bare[key]), key


TP = 2
SHARDABLE = ["bloom", "gemma2", "gemma3"]  # bloom_post_ln_residual's 5 heads do not split in two


def tp_outputs(folder: str) -> dict[str, object]:
    """Prompt logprobs of a chunked 70-token prompt and greedy tokens of a batch, at this process's
    tensor-parallel size."""
    return {"logprobs": torch.tensor(engine_prompt_logprobs(folder, prompts(400, [70])[0])),
            "tokens": engine_greedy(folder, prompts(400, LENGTHS), 8, budget=32, together=True)}


def _tp_worker(rank: int, port: int, folders: dict[str, str], out_dir: str) -> None:
    from tgserve import distributed

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    distributed.init(rank, TP, "gloo")
    results: dict[str, object] = {}
    for name, folder in folders.items():
        try:
            results[name] = tp_outputs(folder)
        except Exception:  # every rank fails alike (same inputs), so no rank is left waiting
            results[name] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2")
    folders = {name: FAMILIES[name](str(root / name)) for name in SHARDABLE}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(_tp_worker, (port, folders, str(root)), TP)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(TP)]
    return ranks, {name: tp_outputs(folder) for name, folder in folders.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARDABLE)
def test_sharded_at_tp2_equals_tp1(tp2_results, name):
    """Heads, KV heads, ALiBi slopes, MLP and vocabulary split over two gloo ranks: the same logprobs
    and tokens (BLOOM's per-head q/k/v reorder happens before QKVParallelLinear takes its shard)."""
    ranks, single = tp2_results
    for rank, results in enumerate(ranks):
        got = results[name]
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        torch.testing.assert_close(got["logprobs"], single[name]["logprobs"], rtol=0, atol=1e-4)
        assert got["tokens"] == single[name]["tokens"]


@pytest.mark.slow
def test_served_through_tgserve(family, server_factory):
    _, folder = family
    serve_and_check(server_factory, folder)
