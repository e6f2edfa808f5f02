"""Block accounting: the pool, a sequence's block table, and that nothing leaks through the scheduler."""

from __future__ import annotations

import pytest

from tgserve.config import SchedulerConfig
from tgserve.engine.kv_cache import BlockPool, KVCacheManager
from tgserve.engine.scheduler import Scheduler
from tgserve.engine.sequence import Sequence
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest
from tgserve.sampling.sampler import SampledTokens


def request(request_id: str, num_prompt: int, max_new_tokens: int = 4) -> AddRequest:
    return AddRequest(request_id, list(range(10, 10 + num_prompt)), SamplingParams(),
                      StoppingParams(max_new_tokens=max_new_tokens), arrival_time=0.0)


def sequence(num_prompt: int = 1) -> Sequence:
    return Sequence(request("s", num_prompt))


def fake_tokens(plan, token: int = 3) -> SampledTokens:
    n = len(plan.sampling)
    return SampledTokens([token] * n, [0.0] * n)


# ---- BlockPool ------------------------------------------------------------------------------------


def test_shared_block_returns_to_the_pool_only_when_its_last_holder_frees_it():
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.share([b])
    pool.free([b])
    assert pool.num_free == 2 and pool.refs(b) == 1
    pool.free([b])
    assert pool.num_free == 3 and pool.refs(b) == 0


def test_pool_needs_a_usable_block_besides_the_null_block():
    with pytest.raises(ValueError):
        BlockPool(1)
    assert BlockPool(2).num_usable == 1


def test_null_block_zero_is_never_handed_out():
    pool = BlockPool(8)
    assert pool.num_free == pool.num_usable == 7
    blocks = pool.allocate(7)
    assert sorted(blocks) == [1, 2, 3, 4, 5, 6, 7]
    assert pool.num_free == 0
    with pytest.raises(AssertionError):
        pool.allocate(1)
    pool.free(blocks)
    assert 0 not in pool.allocate(7)


def test_allocated_blocks_are_distinct_until_freed():
    pool = BlockPool(10)
    a, b = pool.allocate(4), pool.allocate(5)
    assert len(set(a) | set(b)) == 9


def test_most_recently_freed_block_is_reused_first():
    pool = BlockPool(6)
    a = pool.allocate(3)
    pool.free([a[1]])
    assert pool.allocate(1) == [a[1]]


def test_block_freed_twice_trips_the_assertion():
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.free([b])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([b])
    assert pool.num_free == 3  # the second free did not push a duplicate


def test_freeing_a_block_never_allocated_trips_the_assertion():
    pool = BlockPool(4)
    with pytest.raises(AssertionError):
        pool.free([2])
    with pytest.raises(AssertionError):
        pool.free([0])


# ---- KVCacheManager -------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_tokens", "held", "expected"), [
    (0, 0, 0), (1, 0, 1), (4, 0, 1), (5, 0, 2), (8, 0, 2), (9, 0, 3),
    (5, 2, 0), (8, 2, 0), (9, 2, 1), (1, 3, 0),
])
def test_blocks_needed_is_ceil_of_tokens_over_block_size_minus_blocks_held(num_tokens, held, expected):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = sequence()
    assert kv.allocate(seq, held * 4)
    assert len(seq.block_ids) == held
    assert kv.blocks_needed(seq, num_tokens) == expected


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 15, 16, 17])
def test_allocated_blocks_cover_num_tokens(num_tokens):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = sequence()
    assert kv.allocate(seq, num_tokens)
    assert len(seq.block_ids) == -(-num_tokens // 4)
    assert kv.num_free_blocks == 15 - len(seq.block_ids)


def test_allocate_grows_the_block_table_and_keeps_existing_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = sequence()
    kv.allocate(seq, 5)
    first = list(seq.block_ids)
    kv.allocate(seq, 6)  # still fits in two blocks
    assert seq.block_ids == first
    kv.allocate(seq, 13)
    assert seq.block_ids[:2] == first and len(seq.block_ids) == 4


def test_allocate_that_does_not_fit_returns_false_and_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable
    seq = sequence()
    kv.allocate(seq, 4)
    before = list(seq.block_ids)
    assert not kv.allocate(seq, 17)  # needs 4 more, 2 free
    assert seq.block_ids == before
    assert kv.num_free_blocks == 2


def test_can_allocate_honours_the_reserve():
    kv = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable
    assert kv.can_allocate(4)
    assert not kv.can_allocate(4, reserve=1)
    assert kv.can_allocate(3, reserve=1)


def test_manager_free_returns_every_block_and_empties_the_table():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    seq = sequence()
    kv.allocate(seq, 9)
    kv.free(seq)
    assert seq.block_ids == []
    assert kv.num_free_blocks == kv.pool.num_usable


# ---- no leaks through the scheduler ---------------------------------------------------------------


def make_scheduler(num_blocks: int = 32, step_tokens: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_prefill_tokens=step_tokens),
                     KVCacheManager(num_blocks, block_size=4), max_model_len=1024)


def test_all_blocks_return_to_the_pool_after_requests_finish():
    s = make_scheduler()
    for i, n in enumerate([3, 9, 20, 1]):
        s.add(request(f"r{i}", n, max_new_tokens=5))
    finished = set()
    for _ in range(100):
        if not s.has_work():
            break
        plan = s.schedule()
        finished |= {o.request_id for o in s.update(plan, fake_tokens(plan)) if o.finish_reason}
    assert finished == {"r0", "r1", "r2", "r3"}
    assert s.kv.num_free_blocks == s.kv.pool.num_usable


def test_all_blocks_return_to_the_pool_after_aborting_running_and_waiting_requests():
    s = make_scheduler(step_tokens=8)
    s.add(request("running", 6, max_new_tokens=50))
    s.add(request("chunked", 20, max_new_tokens=50))  # admitted with a partial chunk
    s.add(request("waiting", 4, max_new_tokens=50))
    plan = s.schedule()
    s.update(plan, fake_tokens(plan))
    assert [q.request_id for q in s.running] == ["running", "chunked"]
    assert [q.request_id for q in s.waiting] == ["waiting"]
    assert s.kv.num_free_blocks < s.kv.pool.num_usable
    s.abort(["running", "chunked", "waiting", "unknown-id"])
    assert not s.has_work()
    assert s.kv.num_free_blocks == s.kv.pool.num_usable



# ---- forks and copy-on-write ----------------------------------------------------------------------


def test_fork_shares_every_block_and_writing_copies_only_the_shared_block_written():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    parent = sequence(10)
    assert kv.allocate(parent, 10)
    parent.num_computed_tokens = 10
    child = sequence(10)
    child.num_computed_tokens = 10
    kv.fork(parent, child)
    assert child.block_ids == parent.block_ids and kv.num_free_blocks == 6
    shared_last = parent.block_ids[2]
    assert kv.allocate(child, 11)  # writes position 10, inside the shared third block
    assert child.block_ids[:2] == parent.block_ids[:2] and child.block_ids[2] != shared_last
    assert kv.take_copies() == [(shared_last, child.block_ids[2])]
    assert kv.allocate(parent, 11)  # the parent now holds its block alone: written in place
    assert parent.block_ids[2] == shared_last and kv.take_copies() == []
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 9


def test_copy_on_write_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable
    parent, child = sequence(10), sequence(10)
    assert kv.allocate(parent, 10)
    parent.num_computed_tokens = child.num_computed_tokens = 10
    kv.fork(parent, child)
    assert kv.num_free_blocks == 0
    assert not kv.allocate(child, 11)
    assert child.block_ids == parent.block_ids and kv.take_copies() == []


def test_copies_into_blocks_freed_again_are_dropped():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    parent, child = sequence(6), sequence(6)
    assert kv.allocate(parent, 6)
    parent.num_computed_tokens = child.num_computed_tokens = 6
    kv.fork(parent, child)
    assert kv.allocate(child, 7)
    kv.free(child)  # e.g. preempted in the same schedule
    assert kv.take_copies() == []
