"""What the runner reports beyond greedy tokens, on a tiny random Llama run in-process against
transformers: prompt logprobs (also across chunks and preemption), top tokens, and best_of
siblings that share the prompt's KV blocks yet sample exactly as separate requests would."""

from __future__ import annotations

import pytest
import torch

from tgserve.config import SchedulerConfig
from tgserve.engine.core import EngineCore
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.runner import ModelRunner
from tgserve.engine.scheduler import Scheduler
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest, Sibling
from tgserve.weights.loader import load_model

from conftest import build_tiny_llama

CPU = torch.device("cpu")
MAX_LEN = 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from models.test_llama import sharpen_checkpoint

    folder = build_tiny_llama(str(tmp_path_factory.mktemp("tiny-outputs")), seed=3)
    sharpen_checkpoint(folder)
    model, config = load_model(folder, torch.float32, CPU, MAX_LEN)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, config, hf


class Engine:
    def __init__(self, model, *, budget=64, num_blocks=64, block_size=4):
        self.scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget),
                                   KVCacheManager(num_blocks, block_size), MAX_LEN)
        self.core = EngineCore(self.scheduler, ModelRunner(model, num_blocks, block_size, torch.float32, CPU))
        self.outputs: dict[str, list] = {}
        self.preempted = 0

    def add(self, request_id, prompt, sampling=SamplingParams(), n=8, siblings=()):
        self.scheduler.add(AddRequest(request_id, prompt, sampling, StoppingParams(max_new_tokens=n, ignore_eos=True),
                                      0.0, siblings=list(siblings)))

    def run(self):
        while self.scheduler.has_work():
            step = self.core.step()
            for o in step.outputs:
                assert o.error is None, o.error
                self.outputs.setdefault(o.request_id, []).append(o)
        assert self.scheduler.kv.num_free_blocks == self.scheduler.kv.pool.num_usable
        return self

    def tokens(self, request_id):
        return [t for o in self.outputs[request_id] for t in o.token_ids]

    def prompt_logprobs(self, request_id):
        return [lp for o in self.outputs[request_id] for lp in o.prompt_logprobs]


def prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_prompt_logprobs(hf, prompt):
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


@pytest.mark.parametrize("budget", [256, 8], ids=["one-chunk", "chunks-of-8"])
def test_prompt_logprobs_equal_transformers_log_softmax(tiny, budget):
    model, config, hf = tiny
    ps = prompts([30, 1, 19], config.vocab_size)
    engine = Engine(model, budget=budget)
    for i, p in enumerate(ps):
        engine.add(str(i), p, SamplingParams(prompt_logprobs=True), n=2)
    engine.add("plain", prompts([12], config.vocab_size, seed=1)[0], n=3)  # asks for none
    engine.run()
    for i, p in enumerate(ps):
        got = engine.prompt_logprobs(str(i))
        assert len(got) == len(p) - 1
        torch.testing.assert_close(torch.tensor(got), reference_prompt_logprobs(hf, p), atol=1e-4, rtol=0)
    assert engine.prompt_logprobs("plain") == []


def test_prompt_logprobs_are_sent_once_when_a_preempted_prefill_is_recomputed(tiny):
    model, config, hf = tiny
    engine = Engine(model, budget=8, num_blocks=12, block_size=4)  # 11 blocks: 44 tokens for everyone
    ps = prompts([6, 30], config.vocab_size, seed=2)
    engine.add("short", ps[0], n=30)
    engine.add("long", ps[1], SamplingParams(prompt_logprobs=True), n=4)
    schedule = engine.scheduler.schedule

    def counting():
        plan = schedule()
        engine.preempted += len(plan.preempted)
        return plan

    engine.scheduler.schedule = counting
    engine.run()
    assert engine.preempted > 0
    torch.testing.assert_close(torch.tensor(engine.prompt_logprobs("long")), reference_prompt_logprobs(hf, ps[1]),
                               atol=1e-4, rtol=0)


def test_top_tokens_of_a_greedy_request_are_transformers_best_logprobs(tiny):
    model, config, hf = tiny
    [p] = prompts([9], config.vocab_size, seed=4)
    engine = Engine(model)
    engine.add("a", p, SamplingParams(top_n_tokens=3), n=5)
    engine.run()
    tokens = engine.tokens("a")
    with torch.no_grad():
        logits = hf(torch.tensor([p + tokens])).logits[0].float()
    for k, out in enumerate(engine.outputs["a"]):
        ref = logits[len(p) - 1 + k].log_softmax(-1).topk(3)
        assert out.top_ids == [ref.indices.tolist()]
        torch.testing.assert_close(torch.tensor(out.top_logprobs[0]), ref.values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_len", [13, 16], ids=["partial-last-block", "full-blocks"])
def test_best_of_siblings_sample_exactly_as_separate_requests_with_their_seeds(tiny, prompt_len):
    """Shared prompt blocks and the copy-on-write of the last one must not change a single token."""
    model, config, hf = tiny
    [p] = prompts([prompt_len], config.vocab_size, seed=5)
    sampling = SamplingParams(do_sample=True, temperature=1.5, seed=11)
    shared = Engine(model, block_size=4)
    shared.add("a", p, sampling, n=12, siblings=[Sibling("a.1", 22), Sibling("a.2", 33)])
    blocks_after_prefill = []
    step = shared.core.step

    def recording_step():
        out = step()
        blocks_after_prefill.append(shared.scheduler.kv.num_free_blocks)
        return out

    shared.core.step = recording_step
    shared.run()
    alone = Engine(model, block_size=4)
    for request_id, seed in (("a", 11), ("a.1", 22), ("a.2", 33)):
        alone.add(request_id, p, SamplingParams(do_sample=True, temperature=1.5, seed=seed), n=12)
    alone.run()
    for request_id in ("a", "a.1", "a.2"):
        assert shared.tokens(request_id) == alone.tokens(request_id), request_id
    assert len({tuple(shared.tokens(r)) for r in ("a", "a.1", "a.2")}) == 3  # the seeds differ
    # after the prompt step the three sequences hold the prompt's blocks once, not three times
    prompt_blocks = -(-prompt_len // 4)
    assert blocks_after_prefill[0] == 63 - prompt_blocks
