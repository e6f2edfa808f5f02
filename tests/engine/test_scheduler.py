"""Scheduler policy, driven by hand: AddRequests in, fake sampled tokens back, no model."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tgserve.config import SchedulerConfig
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.scheduler import Scheduler, StepPlan
from tgserve.engine.sequence import SequenceStatus
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest, FinishReason, SeqOutput, Sibling
from tgserve.sampling.sampler import SampledTokens

EOS = 2
TOKEN = 7  # what the fake model samples unless told otherwise


def request(request_id: str, num_prompt: int, max_new_tokens: int = 4, eos: tuple[int, ...] = (EOS,),
            ignore_eos: bool = False, generated: tuple[int, ...] = ()) -> AddRequest:
    return AddRequest(request_id, list(range(10, 10 + num_prompt)), SamplingParams(),
                      StoppingParams(max_new_tokens=max_new_tokens, stop_token_ids=eos, ignore_eos=ignore_eos),
                      arrival_time=0.0, generated_ids=list(generated))


def make_scheduler(step_tokens: int = 64, num_blocks: int = 64, block_size: int = 4,
                   max_batch_size: int | None = None, ratio: float = 0.0, max_waiting: int = 20,
                   max_model_len: int = 1024, group: int | None = None) -> Scheduler:
    config = SchedulerConfig(max_batch_prefill_tokens=step_tokens, max_batch_size=max_batch_size,
                             waiting_served_ratio=ratio, max_waiting_tokens=max_waiting, prefill_group_tokens=group)
    return Scheduler(config, KVCacheManager(num_blocks, block_size), max_model_len)


def check_plan(s: Scheduler, plan: StepPlan) -> None:
    """Invariants every plan must keep."""
    assert plan.num_batched_tokens == sum(item.num_tokens for item in plan.scheduled) <= s.step_tokens
    assert len(s.running) <= s.max_running
    assert len({item.seq.request_id for item in plan.scheduled}) == len(plan.scheduled)
    held = [b for q in s.running for b in q.block_ids]
    assert 0 not in held
    for b in set(held):  # a block is shared only through reference counts (best_of siblings)
        assert s.kv.pool.refs(b) == held.count(b)
    for item in plan.scheduled:
        assert item.num_tokens > 0
        assert len(item.seq.block_ids) * s.kv.block_size >= item.seq.num_computed_tokens + item.num_tokens


def step(s: Scheduler, token: int | dict[str, int] = TOKEN) -> tuple[StepPlan, list[SeqOutput]]:
    """One schedule → fake sample → update; `token` may be per request id."""
    plan = s.schedule()
    check_plan(s, plan)
    ids = [token.get(seq.request_id, TOKEN) if isinstance(token, dict) else token for seq in plan.sample_seqs]
    return plan, s.update(plan, SampledTokens(ids, [-0.5] * len(ids)))


def run_to_end(s: Scheduler, max_steps: int = 500) -> tuple[list[StepPlan], dict[str, list[SeqOutput]]]:
    plans, outputs = [], defaultdict(list)
    while s.has_work():
        assert len(plans) < max_steps, "scheduler made no progress"
        plan, outs = step(s)
        plans.append(plan)
        for o in outs:
            outputs[o.request_id].append(o)
    assert s.kv.num_free_blocks == s.kv.pool.num_usable
    return plans, outputs


def tokens_of(plan: StepPlan) -> dict[str, int]:
    return {item.seq.request_id: item.num_tokens for item in plan.scheduled}


# ---- chunking and the step budget -----------------------------------------------------------------


def test_long_prompt_is_chunked_across_steps_within_the_budget():
    s = make_scheduler(step_tokens=8)
    s.add(request("a", 20))
    chunks = []
    for _ in range(3):
        plan, _ = step(s)
        chunks.append(tokens_of(plan)["a"])
    assert chunks == [8, 8, 4]
    assert s.running[0].num_computed_tokens == 20


def test_sequence_samples_only_on_the_step_its_prompt_is_fully_computed():
    s = make_scheduler(step_tokens=8)
    s.add(request("a", 20, max_new_tokens=3))
    samples, emitted = [], []
    for _ in range(4):
        plan, outs = step(s)
        samples.append(plan.scheduled[0].samples)
        emitted.append(len(outs))
    assert samples == [False, False, True, True]
    assert emitted == [0, 0, 1, 1]


def test_running_decodes_are_scheduled_before_new_admissions_and_every_step():
    s = make_scheduler(step_tokens=8)
    s.add(request("a", 3, max_new_tokens=6))
    step(s)
    s.add(request("b", 60))
    for _ in range(5):
        plan, _ = step(s)
        assert plan.scheduled[0].seq.request_id == "a"
        assert plan.scheduled[0].num_tokens == 1 and plan.scheduled[0].samples
        assert tokens_of(plan)["b"] == 7  # what the decode left of the budget


def test_decode_tokens_count_against_the_step_budget():
    s = make_scheduler(step_tokens=10)
    for i in range(3):
        s.add(request(f"d{i}", 2, max_new_tokens=10))
    step(s)
    s.add(request("long", 40))
    plan, _ = step(s)
    assert tokens_of(plan) == {"d0": 1, "d1": 1, "d2": 1, "long": 7}
    assert plan.num_batched_tokens == 10


def test_a_burst_of_short_prompts_is_computed_a_group_per_step_in_arrival_order():
    s = make_scheduler(step_tokens=64, num_blocks=128, group=16)
    for i in range(7):
        s.add(request(f"p{i}", 5, max_new_tokens=20))
    plan, outs = step(s)
    assert tokens_of(plan) == {"p0": 5, "p1": 5, "p2": 5}  # a fourth would make 20 > 16
    assert [o.request_id for o in outs] == ["p0", "p1", "p2"]  # their first tokens come now
    plan, _ = step(s)
    assert tokens_of(plan) == {"p0": 1, "p1": 1, "p2": 1, "p3": 5, "p4": 5, "p5": 5}
    plan, _ = step(s)
    assert tokens_of(plan) == {"p0": 1, "p1": 1, "p2": 1, "p3": 1, "p4": 1, "p5": 1, "p6": 5}
    run_to_end(s)


def test_without_a_group_cap_the_whole_burst_shares_one_step():
    s = make_scheduler(step_tokens=64, num_blocks=128)
    for i in range(7):
        s.add(request(f"p{i}", 5, max_new_tokens=2))
    plan, _ = step(s)
    assert tokens_of(plan) == {f"p{i}": 5 for i in range(7)}


def test_the_first_prompt_of_a_step_may_fill_the_budget_and_later_ones_wait_whole():
    s = make_scheduler(step_tokens=32, num_blocks=128, group=8)
    s.add(request("long", 50, max_new_tokens=2))
    s.add(request("short", 3, max_new_tokens=2))
    chunks = []
    while "short" not in tokens_of(plan := step(s)[0]):
        chunks.append(tokens_of(plan))
    # the long prompt is not cut to the group size; with its last 18 tokens in the step, the short
    # one (18 + 3 > 8) waits for the next step
    assert chunks == [{"long": 32}, {"long": 18}]
    assert tokens_of(plan) == {"long": 1, "short": 3}
    run_to_end(s)


def test_a_second_unfinished_prompt_gets_only_what_is_left_of_the_group():
    s = make_scheduler(step_tokens=16, num_blocks=128, group=12)
    s.add(request("a", 20, max_new_tokens=2))
    step(s)  # a: 16 of 20
    s.add(request("b", 30, max_new_tokens=2))
    plan, _ = step(s)
    assert tokens_of(plan) == {"a": 4}  # b (30) would overrun the group of 12: it waits whole
    plan, _ = step(s)
    assert tokens_of(plan) == {"a": 1, "b": 15}  # b is the first prompt now: the budget's rest
    run_to_end(s)


def test_grouping_keeps_prefix_cache_matches_of_prompts_it_holds_back():
    s = Scheduler(SchedulerConfig(max_batch_prefill_tokens=64, prefill_group_tokens=8),
                  KVCacheManager(64, 4, prefix_caching=True), 1024)
    s.add(request("a", 9, max_new_tokens=3))
    s.add(request("b", 9, max_new_tokens=3))  # the same prompt: its first two blocks are a's
    plan, _ = step(s)
    assert tokens_of(plan) == {"a": 9}  # b's 9 would overrun 9 + 9 > 8: it waits, holding nothing
    assert s.waiting[0].num_computed_tokens == 0 and not s.waiting[0].block_ids
    plan, _ = step(s)
    assert tokens_of(plan)["b"] == 1  # now a's blocks are cached: only b's last token is computed
    run_to_end(s)


def test_updates_hand_each_sampled_token_to_its_own_sequence():
    s = make_scheduler(step_tokens=8)
    s.add(request("a", 2, max_new_tokens=5))
    s.add(request("b", 2, max_new_tokens=5))
    s.add(request("c", 20, max_new_tokens=5))  # mid-prefill: in the plan, samples nothing
    plan, outs = step(s, token={"a": 100, "b": 200})
    assert [item.seq.request_id for item in plan.sampling] == ["a", "b"]
    assert [(o.request_id, o.token_ids, o.logprobs) for o in outs] == [("a", [100], [-0.5]), ("b", [200], [-0.5])]
    assert s.running[2].token_ids == list(range(10, 30))


# ---- admission ------------------------------------------------------------------------------------


def test_admission_is_strictly_fifo_a_head_that_does_not_fit_blocks_the_rest():
    s = make_scheduler(num_blocks=9, block_size=4)  # 8 usable blocks, 1 kept back as watermark
    s.add(request("a", 8, max_new_tokens=6))  # 2 blocks
    s.add(request("big", 24, max_new_tokens=2))  # 6 blocks + watermark: does not fit beside a
    s.add(request("small", 1, max_new_tokens=2))  # would fit, but must not overtake
    plan, _ = step(s)
    assert list(tokens_of(plan)) == ["a"]
    admitted = []
    plans, _ = run_to_end(s)
    for plan in plans:
        admitted += [item.seq.request_id for item in plan.scheduled if item.seq.request_id not in admitted]
    assert admitted == ["a", "big", "small"]


def test_admission_keeps_a_watermark_block_back_while_sequences_run():
    s = make_scheduler(num_blocks=6, block_size=4)  # 5 usable, watermark 1
    s.add(request("a", 3, max_new_tokens=2))
    step(s)
    s.add(request("b", 16, max_new_tokens=1))  # 4 blocks: fits the 4 free ones, not with the watermark
    plan = s.schedule()
    assert list(tokens_of(plan)) == ["a"] and s.kv.num_free_blocks == 4
    s.update(plan, SampledTokens([TOKEN], [0.0]))
    plan, _ = step(s)  # a finished: nothing runs, so nothing is kept back
    assert tokens_of(plan) == {"b": 16}


def test_a_request_may_take_the_whole_cache_when_nothing_runs():
    s = make_scheduler(num_blocks=5, block_size=4)  # 4 usable
    s.add(request("a", 16, max_new_tokens=1))
    _, outputs = run_to_end(s)
    assert outputs["a"][-1].finish_reason is FinishReason.LENGTH


def test_max_batch_size_caps_the_running_batch():
    s = make_scheduler(max_batch_size=2)
    for i in range(5):
        s.add(request(f"r{i}", 3, max_new_tokens=3))
    plan, _ = step(s)
    assert list(tokens_of(plan)) == ["r0", "r1"]
    assert len(s.waiting) == 3
    plans, outputs = run_to_end(s)
    assert max(len(p.scheduled) for p in plans) == 2
    assert len(outputs) == 5


@pytest.mark.parametrize("max_batch_size", [None, 100])
def test_running_batch_never_exceeds_the_step_token_budget(max_batch_size):
    s = make_scheduler(step_tokens=4, max_batch_size=max_batch_size)
    for i in range(10):
        s.add(request(f"r{i}", 1, max_new_tokens=3))
    assert s.max_running == 4
    plans, outputs = run_to_end(s)  # check_plan asserts len(running) <= 4 at every step
    assert max(len(p.scheduled) for p in plans) == 4
    assert all(len(outputs[f"r{i}"]) == 3 for i in range(10))


# ---- preemption -----------------------------------------------------------------------------------


def preempting_scheduler() -> Scheduler:
    """9 usable blocks of 4 tokens: a (2 + 12 tokens), b and c (4 + 12 each) cannot all fit.
    b, not a, is the first to need a block it cannot get (a's prompt is shorter)."""
    s = make_scheduler(num_blocks=10, block_size=4, max_batch_size=3)
    for rid, n in (("a", 2), ("b", 4), ("c", 4), ("d", 4)):
        s.add(request(rid, n, max_new_tokens=12))
    return s


def test_newest_running_sequence_is_preempted_to_the_head_of_the_queue_keeping_its_tokens():
    s = preempting_scheduler()
    for _ in range(20):
        plan, _ = step(s)
        if plan.preempted:
            break
    assert plan.preempted == ("c",)
    assert list(tokens_of(plan)) == ["a", "b"]
    c = s.waiting[0]
    assert [q.request_id for q in s.waiting] == ["c", "d"]
    assert c.status is SequenceStatus.WAITING
    assert c.num_computed_tokens == 0 and c.block_ids == []
    assert c.token_ids[:4] == list(range(10, 14))
    assert c.num_output_tokens == 9 and c.token_ids[4:] == [TOKEN] * 9


def test_preempted_sequence_is_recomputed_and_finishes_with_the_right_output_count():
    s = preempting_scheduler()
    plans, outputs = run_to_end(s)  # also asserts every block came back
    assert [p.preempted for p in plans if p.preempted] == [("c",)]
    recompute = [item for p in plans for item in p.scheduled if item.seq.request_id == "c" and item.num_tokens > 1]
    assert [(item.num_tokens, item.samples) for item in recompute] == [(4, True), (13, True)]
    for rid in ("a", "b", "c", "d"):
        assert sum(len(o.token_ids) for o in outputs[rid]) == 12
        assert outputs[rid][-1].finish_reason is FinishReason.LENGTH


def test_aborting_a_preempted_request_leaks_no_block():
    s = preempting_scheduler()
    while not step(s)[0].preempted:
        pass
    s.abort(["c"])
    assert [q.request_id for q in s.waiting] == ["d"]
    s.abort(["a", "b", "d"])
    assert not s.has_work()
    assert s.kv.num_free_blocks == s.kv.pool.num_usable


# ---- stops ----------------------------------------------------------------------------------------


def test_max_new_tokens_finishes_with_length():
    s = make_scheduler()
    s.add(request("a", 3, max_new_tokens=3))
    _, outputs = run_to_end(s)
    assert [o.finish_reason for o in outputs["a"]] == [None, None, FinishReason.LENGTH]


def test_eos_token_finishes_with_eos_token():
    s = make_scheduler()
    s.add(request("a", 3, max_new_tokens=10))
    step(s)
    _, outs = step(s, token=EOS)
    assert [(o.token_ids, o.finish_reason) for o in outs] == [([EOS], FinishReason.EOS_TOKEN)]
    assert not s.has_work()


def test_eos_token_is_ignored_with_ignore_eos():
    s = make_scheduler()
    s.add(request("a", 3, max_new_tokens=4, ignore_eos=True))
    reasons = [step(s, token=EOS)[1][0].finish_reason for _ in range(4)]
    assert reasons == [None, None, None, FinishReason.LENGTH]


def test_token_not_in_stop_token_ids_does_not_stop():
    s = make_scheduler()
    s.add(request("a", 3, max_new_tokens=4, eos=(99,)))
    assert step(s, token=EOS)[1][0].finish_reason is None


def test_length_takes_precedence_over_eos_on_the_same_token():
    s = make_scheduler()
    s.add(request("a", 3, max_new_tokens=2))
    step(s)
    assert step(s, token=EOS)[1][0].finish_reason is FinishReason.LENGTH


def test_reaching_max_model_len_finishes_with_length():
    s = make_scheduler(max_model_len=6)
    s.add(request("a", 4, max_new_tokens=100))
    _, outputs = run_to_end(s)
    assert len(outputs["a"]) == 2 and outputs["a"][-1].finish_reason is FinishReason.LENGTH


def test_resumed_request_counts_its_generated_tokens_toward_max_new_tokens():
    s = make_scheduler()
    s.add(request("a", 3, max_new_tokens=4, generated=(50, 51)))
    plan, outs = step(s)
    assert tokens_of(plan) == {"a": 5} and plan.scheduled[0].samples  # prompt + generated prefilled
    _, outputs = run_to_end(s)
    tokens = outs[0].token_ids + [t for o in outputs["a"] for t in o.token_ids]
    assert len(tokens) == 2
    assert outputs["a"][-1].finish_reason is FinishReason.LENGTH


# ---- waiting_served_ratio -------------------------------------------------------------------------


def steps_until_admitted(s: Scheduler, request_id: str, limit: int = 50) -> int:
    for n in range(1, limit + 1):
        plan, _ = step(s)
        if request_id in tokens_of(plan):
            return n
    raise AssertionError(f"{request_id} never admitted")


def test_small_waiting_group_is_held_back_while_sequences_run_until_max_waiting_tokens():
    s = make_scheduler(ratio=2.0, max_waiting=3)
    s.add(request("a", 2, max_new_tokens=50))
    step(s)
    s.add(request("b", 2, max_new_tokens=50))  # 1 waiting < 2.0 * 1 running
    assert steps_until_admitted(s, "b") == 4  # held 3 steps, then admitted
    s.add(request("c", 2, max_new_tokens=50))  # the hold counter started over
    assert steps_until_admitted(s, "c") == 4


def test_large_enough_waiting_group_is_admitted_at_once_with_a_ratio():
    s = make_scheduler(ratio=2.0, max_waiting=3)
    s.add(request("a", 2, max_new_tokens=50))
    step(s)
    s.add(request("b", 2))
    s.add(request("c", 2))  # 2 waiting >= 2.0 * 1 running
    plan, _ = step(s)
    assert list(tokens_of(plan)) == ["a", "b", "c"]


def test_waiting_request_is_admitted_at_once_with_ratio_zero():
    s = make_scheduler(ratio=0.0, max_waiting=3)
    s.add(request("a", 2, max_new_tokens=50))
    step(s)
    s.add(request("b", 2))
    assert steps_until_admitted(s, "b") == 1


def test_nothing_is_held_back_when_nothing_runs():
    s = make_scheduler(ratio=10.0, max_waiting=3)
    s.add(request("a", 2))
    assert steps_until_admitted(s, "a") == 1


# ---- a failed step --------------------------------------------------------------------------------


def test_fail_ends_every_sequence_of_the_plan_with_an_error_and_frees_their_blocks():
    s = make_scheduler(step_tokens=8, max_batch_size=2)
    s.add(request("a", 2, max_new_tokens=10))
    s.add(request("b", 20, max_new_tokens=10))
    s.add(request("c", 2, max_new_tokens=2))  # not in the plan: carries on
    step(s)
    plan = s.schedule()
    assert set(tokens_of(plan)) == {"a", "b"}
    outs = s.fail(plan, "RuntimeError: boom")
    assert sorted((o.request_id, o.error, o.token_ids) for o in outs) == [
        ("a", "RuntimeError: boom", []), ("b", "RuntimeError: boom", [])]
    assert s.running == [] and [q.request_id for q in s.waiting] == ["c"]
    assert s.kv.num_free_blocks == s.kv.pool.num_usable
    _, outputs = run_to_end(s)
    assert outputs["c"][-1].finish_reason is FinishReason.LENGTH


# ---- best_of siblings: forked from the computed prompt, sharing its blocks -----------------------


def with_siblings(request_id: str, num_prompt: int, n: int, max_new_tokens: int = 4) -> AddRequest:
    return AddRequest(request_id, list(range(10, 10 + num_prompt)), SamplingParams(do_sample=True, seed=1),
                      StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True), 0.0,
                      siblings=[Sibling(f"{request_id}.{k}", 100 + k) for k in range(1, n)])


def test_siblings_fork_on_the_step_that_completes_the_prompt_and_share_its_blocks():
    s = make_scheduler(step_tokens=8, block_size=4)
    s.add(with_siblings("a", 10, n=3))
    plan, outs = step(s)  # 8 of 10 prompt tokens: no fork yet
    assert not plan.scheduled[0].forks and outs == []
    plan, outs = step(s)  # the last 2: forks sample from the same row
    [item] = plan.scheduled
    assert [f.request_id for f in item.forks] == ["a.1", "a.2"]
    assert [f.sampling.seed for f in item.forks] == [101, 102]
    assert [o.request_id for o in outs] == ["a", "a.1", "a.2"]
    assert [seq.request_id for seq in plan.sample_seqs] == ["a", "a.1", "a.2"]
    # 10 prompt tokens in 3 blocks, held by all three: no second prefill, no copy of the prompt
    assert s.kv.num_free_blocks == s.kv.pool.num_usable - 3
    assert all(seq.block_ids == s.running[0].block_ids for seq in s.running)
    assert all(s.kv.pool.refs(b) == 3 for b in s.running[0].block_ids)


def test_a_shared_partial_block_is_copied_before_a_sibling_writes_into_it():
    s = make_scheduler(step_tokens=16, block_size=4)
    s.add(with_siblings("a", 10, n=3))  # the prompt's last block holds 2 of 4 tokens
    step(s)
    plan, _ = step(s)  # each sequence writes its first generated token at position 10
    # the first two writers copy the shared block; the last holds it alone and writes in place
    assert len(plan.block_copies) == 2
    sources = {src for src, _ in plan.block_copies}
    assert len(sources) == 1
    [src] = sources
    tables = [seq.block_ids for seq in s.running]
    assert sum(t[2] == src for t in tables) == 1
    assert all(t[:2] == tables[0][:2] for t in tables)  # the full blocks stay shared
    assert s.kv.num_free_blocks == s.kv.pool.num_usable - 5  # 3 prompt blocks + 2 copies, not 9


def test_siblings_finish_independently_and_every_block_returns():
    s = make_scheduler(step_tokens=16, block_size=4)
    s.add(with_siblings("a", 9, n=2, max_new_tokens=6))
    _, outputs = run_to_end(s)
    assert sorted(outputs) == ["a", "a.1"]
    for request_id in ("a", "a.1"):
        assert sum(len(o.token_ids) for o in outputs[request_id]) == 6
        assert outputs[request_id][-1].finish_reason is FinishReason.LENGTH


def test_a_rejected_request_fails_its_unforked_siblings_too():
    s = make_scheduler(step_tokens=64, num_blocks=4, block_size=4)  # 3 usable blocks: 12 tokens
    s.add(with_siblings("big", 20, n=2))
    plan, outs = step(s)
    assert sorted(o.request_id for o in outs) == ["big", "big.1"]
    assert all(o.error for o in outs)
    assert not s.has_work()


def test_aborting_one_sibling_leaves_the_other_running_with_the_shared_blocks():
    s = make_scheduler(step_tokens=16, block_size=4)
    s.add(with_siblings("a", 8, n=2, max_new_tokens=5))
    step(s)
    s.abort(["a"])
    [left] = s.running
    assert left.request_id == "a.1"
    assert all(s.kv.pool.refs(b) == 1 for b in left.block_ids)
    _, outputs = run_to_end(s)
    assert sum(len(o.token_ids) for o in outputs["a.1"]) == 4


def test_preempting_a_sibling_frees_only_its_references():
    s = make_scheduler(step_tokens=16, num_blocks=7, block_size=4)  # 6 usable blocks
    s.add(with_siblings("a", 8, n=2, max_new_tokens=12))
    step(s)  # prompt: 2 shared blocks
    while s.has_work():
        plan, _ = step(s)
        if plan.preempted:
            break
    assert plan.preempted == ("a.1",)
    [runner] = s.running
    assert all(s.kv.pool.refs(b) == 1 for b in runner.block_ids)
    _, outputs = run_to_end(s)
    assert outputs["a.1"][-1].finish_reason is FinishReason.LENGTH


def test_a_request_and_its_siblings_stay_within_the_batch_size_cap():
    s = make_scheduler(step_tokens=64, block_size=4, max_batch_size=3)
    s.add(request("a", 4, max_new_tokens=8))
    s.add(with_siblings("b", 4, n=3, max_new_tokens=4))
    plan, _ = step(s)
    assert tokens_of(plan) == {"a": 4}  # b and its two siblings would make four
    _, outputs = run_to_end(s)
    assert sorted(outputs) == ["a", "b", "b.1", "b.2"]
