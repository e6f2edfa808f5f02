"""Continuous batching in tokens: what each step computes, and what the step's results mean.

`schedule()` gives running sequences their tokens first (one for a decode, the next chunk for an
unfinished prefill), then admits waiting sequences in arrival order while the step's token budget,
the batch-size cap and the free KV blocks allow. Prompts are grouped: the step's first prompt
chunk may fill the budget, but a further prompt joins only whole and only while the step's prompt
tokens stay within `prefill_group_tokens`, so a burst of short prompts is computed a group per
step and the first groups get their first token early (everyone waited for the whole burst
before; the total work is the same). When a running sequence needs a block and none is
free, the newest running sequence is preempted: its blocks are freed and it goes back to the head
of the queue, keeping its tokens, to be recomputed later. `update()` appends sampled tokens and
applies the token-level stops (max_new_tokens, EOS).

A request with siblings (best_of) runs as one sequence until its prompt is computed; the step
that computes the prompt's last chunk forks the siblings, which share the prompt's KV blocks and
sample their first token from the same logits row with their own seeds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from tgserve.config import SchedulerConfig
from tgserve.engine.kv_cache import KVCacheManager
from tgserve.engine.sequence import Sequence, SequenceStatus
from tgserve.protocol import AddRequest, EngineStats, FinishReason, SeqOutput
from tgserve.sampling.sampler import SampledTokens


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for this sequence in this step
    samples: bool  # whether the step ends with a new token for it
    forks: tuple[Sequence, ...] = ()  # siblings forked in this step: they sample from seq's last row
    encodes: bool = False  # run the encoder on seq's encoder input first, writing its cross blocks


@dataclass(frozen=True, slots=True)
class StepPlan:
    scheduled: tuple[ScheduledSeq, ...]
    num_batched_tokens: int
    preempted: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()  # sequences that cannot fit even in an empty cache
    block_copies: tuple[tuple[int, int], ...] = ()  # (source, destination) before the forward pass

    @property
    def sampling(self) -> list[ScheduledSeq]:
        return [s for s in self.scheduled if s.samples]

    @property
    def sample_seqs(self) -> list[Sequence]:
        """One per sampled row, in row order: each sampling sequence, then its new forks."""
        return [q for s in self.scheduled if s.samples for q in (s.seq, *s.forks)]


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 decoder_start: int | None = None):
        """`decoder_start`: the model is an encoder-decoder whose decoder begins with this token."""
        if config.max_batch_prefill_tokens is None:
            raise ValueError("max_batch_prefill_tokens must be resolved before the scheduler starts")
        self.step_tokens = config.max_batch_prefill_tokens
        self.group_tokens = config.prefill_group_tokens  # None: prompts fill the budget, no groups
        # running decodes always fit in a step: never run more sequences than the step has tokens
        self.max_running = min(config.max_batch_size or self.step_tokens, self.step_tokens)
        self.waiting_served_ratio = config.waiting_served_ratio
        self.max_waiting_tokens = config.max_waiting_tokens
        self.kv = kv
        self.max_model_len = max_model_len
        self.decoder_start = decoder_start
        self.watermark_blocks = max(1, kv.pool.num_usable // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held_steps = 0
        self._by_id: dict[str, Sequence] = {}
        self._new_forks: list[Sequence] = []
        self._finished: list[str] = []  # ended since the last pop_finished()

    # ---- requests in and out ------------------------------------------------------------------

    def add(self, request: AddRequest) -> None:
        seq = Sequence(request, self.decoder_start)
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            seq = self._by_id.get(request_id)
            if seq is not None:
                self._finish(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pop_finished(self) -> list[str]:
        """Ids of the sequences that ended since the last call (the runner drops their state)."""
        finished, self._finished = self._finished, []
        return finished

    def stats(self, num_batched_tokens: int = 0, step_seconds: float = 0.0,
              phases: dict[str, float] | None = None) -> EngineStats:
        return EngineStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            num_free_blocks=self.kv.num_free_blocks, num_total_blocks=self.kv.pool.num_usable,
            num_batched_tokens=num_batched_tokens, step_seconds=step_seconds,
            prefix_cache_hit_tokens=self.kv.prefix_hit_tokens, phases=phases or {},
        )

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.step_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        rejected: list[str] = []
        i = 0
        prompt = 0  # prompt (prefill) tokens in this step so far
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n > 1 and prompt and self.group_tokens:  # another unfinished prompt: only what is left of the group
                n = min(n, self.group_tokens - prompt)
                if n < 1:
                    i += 1
                    continue
            while not self.kv.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:  # alone and still too big: it never fits
                    rejected.extend(self._group_ids(seq))
                    self._finish(seq)
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: nothing after it is left either
            scheduled.append(self._scheduled(seq, n))
            budget -= n
            prompt += n if n > 1 else 0
            i += 1
        if not preempted:
            budget = self._admit(scheduled, budget, rejected, prompt)
        self.running.extend(self._new_forks)  # they join now, so this step did not schedule them
        self._new_forks = []
        return StepPlan(tuple(scheduled), self.step_tokens - budget, tuple(preempted), tuple(rejected),
                        tuple(self.kv.take_copies()))

    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSeq:
        samples = seq.num_computed_tokens + n == seq.num_tokens
        encodes = seq.encoder_ids is not None and not seq.encoded
        if not (samples and seq.siblings):
            return ScheduledSeq(seq, n, samples, encodes=encodes)
        forks = []
        for sibling in seq.siblings:  # the prompt is complete after this step: fork it
            child = seq.fork(sibling)
            self.kv.fork(seq, child)
            self._by_id[child.request_id] = child
            forks.append(child)
        seq.siblings = []
        self._new_forks.extend(forks)
        return ScheduledSeq(seq, n, samples, tuple(forks), encodes)

    @staticmethod
    def _group_ids(seq: Sequence) -> list[str]:
        """The sequence and the siblings it has not forked yet (they end with it)."""
        return [seq.request_id, *(s.request_id for s in seq.siblings)]

    def _admit(self, scheduled: list[ScheduledSeq], budget: int, rejected: list[str], prompt: int) -> int:
        if not self.waiting:
            return budget
        if self.running and self.waiting_served_ratio > 0:
            # TGI's rule: let a running batch serve until enough requests wait, or they waited long enough
            enough = len(self.waiting) >= self.waiting_served_ratio * len(self.running)
            if not enough and self.held_steps < self.max_waiting_tokens:
                self.held_steps += 1
                return budget
        self.held_steps = 0
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if self.running and len(self.running) + 1 + len(seq.siblings) > self.max_running:
                break  # its siblings will run too: wait until there is room for all of them
            # an encoder runs whole, in the step that admits its sequence: its tokens count against
            # the budget and may overrun what is left of it (it cannot be chunked; it never waits)
            encoder = len(seq.encoder_ids) if seq.encoder_ids is not None and not seq.encoded else 0
            matched = self.kv.match_prefix(seq)  # cached prefix blocks: computed already
            if self.group_tokens and prompt and prompt + seq.num_uncomputed_tokens > self.group_tokens:
                if matched:
                    self.kv.unmatch(seq)
                break  # the step has its group of prompts: this one starts the next step's
            n = min(seq.num_uncomputed_tokens, max(budget - encoder, 1))
            # keep a few blocks back for the running decodes, unless nothing runs
            reserve = self.watermark_blocks if self.running else 0
            need = self.kv.blocks_needed(seq, seq.num_computed_tokens + n) + self.kv.cross_blocks_needed(seq)
            if need + len(seq.block_ids) > self.kv.pool.num_usable:  # not even an empty cache holds it
                rejected.extend(self._group_ids(seq))
                self._finish(seq)
                continue
            if not self.kv.can_allocate(need, reserve):
                if matched:
                    self.kv.unmatch(seq)
                break  # strictly FIFO: nobody overtakes the head of the queue
            self.kv.allocate_cross(seq)
            self.kv.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._scheduled(seq, n))
            budget -= n + encoder
            prompt += n if n > 1 else 0
        return max(budget, 0)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.block_ids or seq.cross_block_ids:
            self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        self._by_id.pop(seq.request_id, None)
        self._finished.append(seq.request_id)

    # ---- results of a step --------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: SampledTokens) -> list[SeqOutput]:
        outputs = [SeqOutput(r, error="the request needs more KV-cache blocks than the server has")
                   for r in plan.rejected]
        j = 0
        for index, item in enumerate(plan.scheduled):
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            self.kv.register_computed(seq)  # its newly full blocks join the prefix cache
            seq.encoded = seq.encoded or item.encodes
            prompt_logprobs = sampled.prompt_logprobs.get(index, [])
            seq.num_prompt_logprobs += len(prompt_logprobs)
            if not item.samples:
                if prompt_logprobs:
                    outputs.append(SeqOutput(seq.request_id, prompt_logprobs=prompt_logprobs))
                continue
            for s in (seq, *item.forks):
                s.num_computed_tokens = seq.num_computed_tokens
                token = sampled.token_ids[j]
                s.token_ids.append(token)
                reason = self._finish_reason(s, token)
                if reason is not None:
                    self._finish(s)
                top_ids, top_logprobs = sampled.top(j)
                outputs.append(SeqOutput(s.request_id, [token], [sampled.logprobs[j]], reason, None,
                                         top_ids, top_logprobs, prompt_logprobs if s is seq else []))
                j += 1
        return outputs

    def fail(self, plan: StepPlan, error: str) -> list[SeqOutput]:
        """The step raised: every sequence in it ends with the error; the rest carry on."""
        outputs = []
        for item in plan.scheduled:
            for seq in (item.seq, *item.forks):
                if seq.status is not SequenceStatus.FINISHED:
                    outputs.extend(SeqOutput(i, error=error) for i in self._group_ids(seq))
                    self._finish(seq)
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        stopping = seq.stopping
        if seq.num_output_tokens >= stopping.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        if not stopping.ignore_eos and token in stopping.stop_token_ids:
            return FinishReason.EOS_TOKEN
        return None
