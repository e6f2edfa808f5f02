"""Automatic prefix caching (engine/kv_cache.py): full computed blocks registered under a hash of
their whole prefix, reused by later sequences with the same first tokens, evicted least recently
used; and the engine's greedy tokens with it equal transformers' (so equal to a run without it),
for requests sharing a prefix one after another and at once, under eviction and preemption."""

from __future__ import annotations

import pytest
import torch

from tgserve.config import SchedulerConfig
from tgserve.engine.kv_cache import BlockPool, KVCacheManager
from tgserve.engine.scheduler import Scheduler
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest
from tgserve.sampling.sampler import SampledTokens

from conftest import build_tiny_llama
from models.families import engine_greedy, transformers_greedy

BS = 4


def test_a_freed_registered_block_stays_cached_and_counts_as_free():
    pool = BlockPool(4)  # usable blocks 1..3
    a, b = pool.allocate(2)
    pool.register(a, 111)
    pool.free([a, b])
    assert pool.num_free == 3 and pool.num_cached == 1
    assert pool.lookup(111) == a
    pool.take(a)  # a match takes it back out of the cached pool
    assert pool.num_free == 2 and pool.refs(a) == 1 and pool.lookup(111) == a


def test_cached_blocks_are_evicted_last_and_least_recently_used_first():
    pool = BlockPool(5)  # usable 1..4
    blocks = pool.allocate(4)
    for h, blk in enumerate(blocks[:3]):
        pool.register(blk, 100 + h)
    pool.free([blocks[1]])  # cached first: the least recently used
    pool.free([blocks[0], blocks[2], blocks[3]])  # blocks[3] holds nothing: empty
    assert pool.allocate(1) == [blocks[3]]  # empty blocks go before cached ones
    assert pool.allocate(1) == [blocks[1]]  # then the least recently used cached one...
    assert pool.lookup(101) is None  # ...whose prefix is forgotten
    assert pool.lookup(100) == blocks[0] and pool.lookup(102) == blocks[2]


def test_a_prefix_keeps_the_first_block_registered_for_it():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.register(a, 7)
    pool.register(b, 7)  # the same prefix computed twice (two sequences admitted together)
    assert pool.lookup(7) == a
    pool.free([b])
    assert pool.num_cached == 0  # b holds no registered prefix: an ordinary free block


def _scheduler(num_blocks=32, budget=64, caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget), KVCacheManager(num_blocks, BS, caching), 256)


def _request(rid: str, prompt: list[int], n: int = 2, **sampling) -> AddRequest:
    return AddRequest(rid, prompt, SamplingParams(**sampling), StoppingParams(max_new_tokens=n, ignore_eos=True), 0.0)


def _run(s: Scheduler) -> list:
    """Every step's plan until nothing is left; each sampling row gets token 1."""
    plans = []
    while s.has_work():
        plan = s.schedule()
        plans.append(plan)
        n = len(plan.sample_seqs)
        s.update(plan, SampledTokens([1] * n, [0.0] * n))
    return plans


def test_a_sequence_starting_with_a_computed_prefix_computes_only_the_rest():
    s = _scheduler()
    first = list(range(10, 50))  # 40 tokens: 10 full blocks
    s.add(_request("a", first))
    _run(s)
    s.add(_request("b", first[:33] + [7, 8, 9]))  # 36 tokens: its first 8 blocks are a's
    plan = s.schedule()
    [item] = plan.scheduled
    assert item.seq.num_computed_tokens == 32 and item.num_tokens == 4
    assert s.kv.prefix_hit_tokens == 32


def test_the_same_prompt_again_leaves_its_last_token_to_compute():
    s = _scheduler()
    prompt = list(range(10, 50))  # 40 tokens, exactly 10 blocks
    s.add(_request("a", prompt))
    _run(s)
    s.add(_request("b", prompt))
    [item] = s.schedule().scheduled
    assert item.seq.num_computed_tokens == 36 and item.num_tokens == 4  # 9 blocks; the 10th recomputed


def test_prompt_logprobs_requests_and_disabled_caching_compute_their_whole_prompt():
    prompt = list(range(10, 50))
    for caching, sampling in ((True, {"prompt_logprobs": True}), (False, {})):
        s = _scheduler(caching=caching)
        s.add(_request("a", prompt))
        _run(s)
        s.add(_request("b", prompt, **sampling))
        [item] = s.schedule().scheduled
        assert item.seq.num_computed_tokens == 0 and item.num_tokens == 40


def test_a_match_that_cannot_be_admitted_gives_its_blocks_back():
    s = _scheduler(num_blocks=13)  # 12 usable blocks
    prompt = list(range(10, 50))
    s.add(_request("a", prompt))
    _run(s)  # 11 blocks, 10 of them cached
    s.add(_request("hog", list(range(100, 108)), n=20))  # 2 blocks
    s.schedule()
    s.add(_request("b", prompt[:32] + list(range(200, 212))))  # a's first 8 blocks + 3 new: no room
    plan = s.schedule()
    assert [i.seq.request_id for i in plan.scheduled] == ["hog"]
    b = s.waiting[0]
    assert s.kv.prefix_hit_tokens == 0 and not b.block_ids and b.num_computed_tokens == 0
    assert s.kv.pool.lookup(b.block_hashes[0]) is not None  # still cached for later
    assert s.kv.num_free_blocks == 12 - 2  # all but hog's


def test_a_finished_sequences_last_blocks_are_evicted_before_its_first():
    s = _scheduler(num_blocks=13)
    prompt = list(range(10, 50))
    s.add(_request("a", prompt))
    _run(s)
    s.add(_request("hog", list(range(100, 124)), n=1))  # 6 blocks: 2 empty ones, then 4 cached ones
    _run(s)
    s.add(_request("b", prompt))
    [item] = s.schedule().scheduled
    assert item.seq.num_computed_tokens == 24  # a's blocks 6..9 went, 0..5 are still there


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return build_tiny_llama(str(tmp_path_factory.mktemp("prefix-llama")), num_hidden_layers=2)


def _batch(vocab: int) -> list[list[int]]:
    """Four prompts sharing a 37-token system prompt (not a whole number of 16-token blocks), one
    of them the system prompt itself plus one token, and one sharing only its first block."""
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, vocab, (37,), generator=g).tolist()
    tail = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 20, 1)]
    other = system[:16] + torch.randint(3, vocab, (30,), generator=g).tolist()
    return [system + tail[0], system + tail[1], system + tail[2], other]


@pytest.mark.parametrize("together", [False, True], ids=["one-after-another", "at-once"])
def test_greedy_with_prefix_caching_equals_transformers(llama_dir, together):
    from transformers import AutoConfig

    batch = _batch(AutoConfig.from_pretrained(llama_dir).vocab_size)
    expected = transformers_greedy(llama_dir, batch, 10)
    stats: dict = {}
    got = engine_greedy(llama_dir, batch, 10, budget=32, together=together, prefix_caching=True, stats=stats)
    assert got == expected
    if not together:  # the later prompts found the first one's blocks
        assert stats["prefix_hit_tokens"] == 32 + 32 + 16


def test_greedy_under_eviction_and_preemption_equals_transformers(llama_dir):
    """A cache of 12 blocks of 16: the shared prefix's blocks are evicted by other prompts and
    recomputed, and running sequences are preempted and find their own blocks again."""
    from transformers import AutoConfig

    batch = _batch(AutoConfig.from_pretrained(llama_dir).vocab_size)
    batch = batch + batch[:2]
    expected = transformers_greedy(llama_dir, batch, 24)
    stats: dict = {}
    got = engine_greedy(llama_dir, batch, 24, budget=32, together=True, num_blocks=13, prefix_caching=True,
                        stats=stats)
    assert got == expected
    assert stats["prefix_hit_tokens"] > 0
