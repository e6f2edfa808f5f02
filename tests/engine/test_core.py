"""The engine loop and its guards: no spinning when nothing can run, no request that never ends."""

from __future__ import annotations

from tgserve.config import SchedulerConfig
from tgserve.engine.core import IDLE_POLL_MS, EngineCore
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.scheduler import Scheduler, StepPlan
from tgserve.params import SamplingParams, StoppingParams
from tgserve.protocol import AddRequest, Shutdown
from tgserve.sampling.sampler import SampledTokens


class FakeChannel:
    """Plays the API's side: hands over `inbox` once, then shuts the engine down after N receives."""

    def __init__(self, inbox: list, max_receives: int):
        self.inbox, self.max_receives = inbox, max_receives
        self.timeouts: list[int] = []
        self.sent: list = []

    def receive(self, timeout_ms: int) -> list:
        self.timeouts.append(timeout_ms)
        if len(self.timeouts) >= self.max_receives:
            return [Shutdown()]
        messages, self.inbox = self.inbox, []
        return messages

    def send(self, message) -> None:
        self.sent.append(message)


class FakeRunner:
    def execute(self, plan: StepPlan, profile=None) -> SampledTokens:
        n = len(plan.sampling)
        return SampledTokens([5] * n, [0.0] * n)

    def admit(self, request_id, sampling, generated) -> None:
        if sampling.grammar is not None:
            raise ValueError("no grammar support here")

    def release(self, request_ids: list[str]) -> None:
        pass

    def keep_alive(self) -> None:
        pass


def request(request_id: str, prompt_len: int, max_new_tokens: int = 4) -> AddRequest:
    return AddRequest(request_id, list(range(1, prompt_len + 1)), SamplingParams(),
                      StoppingParams(max_new_tokens=max_new_tokens), 0.0)


def scheduler(num_blocks: int, step_tokens: int) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_prefill_tokens=step_tokens),
                     KVCacheManager(num_blocks=num_blocks, block_size=4), max_model_len=64)


def test_a_sequence_bigger_than_the_whole_cache_is_failed_not_recomputed_forever():
    sched = scheduler(num_blocks=3, step_tokens=4)  # 2 usable blocks: 8 tokens
    channel = FakeChannel([request("big", 19), request("small", 3)], max_receives=40)
    EngineCore(sched, FakeRunner()).run(channel)
    outputs = [o for step in channel.sent for o in step.outputs]
    errors = [o for o in outputs if o.error]
    assert [o.request_id for o in errors] == ["big"] and "more KV-cache blocks" in errors[0].error
    assert [o.finish_reason for o in outputs if o.request_id == "small"][-1] is not None
    assert not sched.has_work() and sched.kv.num_free_blocks == 2


def test_a_first_chunk_that_no_empty_cache_holds_is_failed_at_admission():
    sched = scheduler(num_blocks=3, step_tokens=16)  # the first chunk (16 tokens) needs 4 blocks
    sched.add(request("big", 19))
    plan = sched.schedule()
    assert plan.rejected == ("big",) and not plan.scheduled
    assert sched.update(plan, SampledTokens([], []))[0].error


class StuckScheduler(Scheduler):
    """Has work but can never schedule it (a state no valid configuration reaches)."""

    def schedule(self) -> StepPlan:
        return StepPlan((), 0)


def test_a_step_that_schedules_nothing_makes_the_loop_wait_instead_of_spinning():
    sched = StuckScheduler(SchedulerConfig(max_batch_prefill_tokens=8), KVCacheManager(8, 4), 64)
    channel = FakeChannel([request("stuck", 3)], max_receives=10)
    EngineCore(sched, FakeRunner()).run(channel)
    assert channel.timeouts[0] == IDLE_POLL_MS and channel.timeouts[2:] == [IDLE_POLL_MS] * 8
    assert len(channel.sent) == 2  # one per arriving message batch (request, shutdown), none per idle poll


def test_a_rejection_on_a_quiet_step_still_reaches_the_api():
    """The rejecting step computes nothing and no message arrives with it: its error must still be sent."""
    sched = scheduler(num_blocks=3, step_tokens=4)  # 2 usable blocks; the third chunk cannot fit
    channel = FakeChannel([request("big", 19)], max_receives=30)
    EngineCore(sched, FakeRunner()).run(channel)
    errors = [o for step in channel.sent for o in step.outputs if o.error]
    assert [o.request_id for o in errors] == ["big"]


def test_a_request_refused_on_arrival_gets_its_error_and_the_engine_serves_the_rest():
    from tgserve.params import GrammarSpec

    sched = scheduler(num_blocks=16, step_tokens=8)
    bad = AddRequest("bad", [1, 2], SamplingParams(grammar=GrammarSpec("regex", "a")), StoppingParams(max_new_tokens=2),
                     0.0)
    channel = FakeChannel([bad, request("good", 3)], max_receives=20)
    EngineCore(sched, FakeRunner()).run(channel)
    outputs = [o for step in channel.sent for o in step.outputs]
    [error] = [o for o in outputs if o.request_id == "bad"]
    assert "no grammar support here" in error.error
    assert [o.finish_reason for o in outputs if o.request_id == "good"][-1] is not None
