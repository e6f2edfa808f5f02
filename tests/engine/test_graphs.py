"""Decode steps through DecodeGraphs' static, padded inputs (what a CUDA graph replays), run eagerly
here: greedy tokens still equal transformers' with padded rows and padded block tables in the
batch, forked rows sample as in an eager step, a model whose capture fails runs eagerly, and on the
meta device a Llama step reads no tensor on the host (a capture would fail on such a read), while
an MoE step does (the check can fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgserve.config import ConfigError, SchedulerConfig, cuda_graph_sizes
from tgserve.engine.core import EngineCore
from tgserve.engine.graphs import DecodeGraphs
from tgserve.engine.inputs import StepInputs
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.runner import ModelRunner
from tgserve.engine.scheduler import Scheduler
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest, Sibling
from tgserve.weights.loader import load_model

from conftest import build_tiny_llama

CPU = torch.device("cpu")
MAX_LEN = 256
SIZES = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from models.test_llama import sharpen_checkpoint
    from transformers import AutoModelForCausalLM

    folder = build_tiny_llama(str(tmp_path_factory.mktemp("tiny-graphs")), seed=5)
    sharpen_checkpoint(folder)
    model, _ = load_model(folder, torch.float32, CPU, MAX_LEN)
    return model, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def engine(model, graph_sizes=SIZES, num_blocks=96, block_size=4):
    runner = ModelRunner(model, num_blocks, block_size, torch.float32, CPU, graph_sizes=graph_sizes,
                         capture_graphs=False)
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64), KVCacheManager(num_blocks, block_size), MAX_LEN)
    return EngineCore(scheduler, runner)


def run(core, requests, arrivals=None):
    """requests: (id, prompt, sampling, siblings, new tokens); arrivals: step index at which each is added."""
    arrivals = arrivals or [0] * len(requests)
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or core.scheduler.has_work():
        for (rid, prompt, sampling, siblings, n), at in zip(requests, arrivals):
            if at == step:
                core.scheduler.add(AddRequest(rid, prompt, sampling, StoppingParams(max_new_tokens=n, ignore_eos=True),
                                              0.0, siblings=list(siblings)))
        for o in core.step().outputs:
            assert o.error is None, o.error
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
        step += 1
    return tokens


def transformers_greedy(hf, prompt, n):
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_through_padded_graph_inputs_equals_transformers(tiny):
    model, hf = tiny
    g = torch.Generator().manual_seed(11)
    lengths = (3, 17, 1, 9, 30, 6, 12)  # 7 sequences, arriving over time: batches of 1 to 7 decodes
    prompts = [torch.randint(2, model.lm_head.vocab_size, (n,), generator=g).tolist() for n in lengths]
    core = engine(model)
    got = run(core, [(str(i), p, SamplingParams(), (), 20) for i, p in enumerate(prompts)],
              arrivals=[0, 0, 2, 5, 5, 9, 14])
    for i, p in enumerate(prompts):
        assert got[str(i)] == transformers_greedy(hf, p, 20), f"sequence {i}"
    used = set(core.runner.graphs.graphs)
    assert {b for b, _ in used} >= {1, 2, 4, 8}, used  # padded batches (3 → 4, 5..7 → 8) ran
    assert len({w for _, w in used}) >= 2, used  # block tables of several widths, padded to a power of two


def test_forked_rows_sample_as_in_an_eager_step(tiny):
    model, _ = tiny
    sampling = SamplingParams(temperature=0.9, top_p=0.95, do_sample=True, seed=4)
    siblings = [Sibling("a-1", 5), Sibling("a-2", 6)]
    requests = [("a", list(range(2, 13)), sampling, siblings, 12),
                ("b", list(range(40, 47)), SamplingParams(do_sample=True, seed=9), (), 12)]
    with_graphs = run(engine(model), requests)
    eager = run(engine(model, graph_sizes=()), requests)
    assert with_graphs == eager
    assert set(with_graphs) == {"a", "a-1", "a-2", "b"}


def test_a_model_whose_capture_fails_runs_eagerly(tiny, monkeypatch):
    model, hf = tiny
    core = engine(model)

    def refuse(self, batch, width):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_build", refuse)
    prompt = [5, 9, 2, 44, 7]
    assert run(core, [("x", prompt, SamplingParams(), (), 10)])["x"] == transformers_greedy(hf, prompt, 10)
    assert "not permitted" in core.runner.graphs.disabled and not core.runner.graphs.graphs


def decode_step(rows: int, vocab: int, block_size: int = 4) -> StepInputs:
    lens = np.arange(rows, dtype=np.int64) * 3 + 2  # keys per row
    width = int(-(-lens.max() // block_size))
    used = np.arange(width) < -(-lens[:, None] // block_size)  # the blocks each row's keys fill
    table = (np.arange(rows * width, dtype=np.int64).reshape(rows, width) + 1) * used
    slots = table[np.arange(rows), (lens - 1) // block_size] * block_size + (lens - 1) % block_size
    return StepInputs(block_size=block_size, block_copies=(), input_ids=np.arange(rows, dtype=np.int64) % vocab + 2,
                      positions=lens - 1, slot_mapping=slots, num_decode=rows, decode_table=table, decode_lens=lens,
                      prefills=(), sample_indices=np.arange(rows, dtype=np.int64), starts=tuple(range(rows)))


def meta_model(hf_config, num_blocks=64, block_size=4):
    from tgserve.models.registry import build_model

    with torch.device("meta"):
        model = build_model(hf_config, torch.float32, MAX_LEN)
        for layer in model.attention_layers():
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            layer.bind_cache(torch.zeros(shape), torch.zeros(shape))
    return model.eval()


def test_a_llama_decode_step_reads_no_tensor_on_the_host():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                         architectures=["LlamaForCausalLM"])
    graphs = DecodeGraphs(meta_model(config), torch.device("meta"), SIZES, 4, capture=False)
    with torch.inference_mode():
        logits = graphs.run(decode_step(5, 300))
    assert logits.device.type == "meta" and tuple(logits.shape) == (5, 300)


def test_the_meta_check_catches_a_step_that_reads_a_tensor_on_the_host():
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           max_position_embeddings=MAX_LEN, architectures=["MixtralForCausalLM"])
    graphs = DecodeGraphs(meta_model(config), torch.device("meta"), SIZES, 4, capture=False)
    with torch.inference_mode(), pytest.raises((RuntimeError, NotImplementedError)):
        graphs.run(decode_step(5, 300))  # routing sizes its expert groups on the host


def test_cuda_graph_sizes_follow_tgi_flag():
    assert cuda_graph_sizes("1,2,4,8,16,32") == (1, 2, 4, 8, 16, 32)
    assert cuda_graph_sizes("32, 4,4,1") == (1, 4, 32)
    assert cuda_graph_sizes("0") == () and cuda_graph_sizes("") == ()
    for bad in ("a,b", "4,-1", "0,2"):
        with pytest.raises(ConfigError):
            cuda_graph_sizes(bad)
