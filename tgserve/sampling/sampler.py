"""Choose each row's next token from its logits, all rows at once, and report its logprob.

The pipeline, in TGI's order, each stage over only the rows that use it:
watermark → repetition/frequency penalties → grammar mask (every row that asks, greedy or not),
then for sampled rows temperature → top-k → top-p → typical-p and an inverse-CDF pick with the
row's counter-based uniform draw; greedy rows take the argmax of their processed scores. The
reported logprob (and the top-n alternatives) is the log-softmax of the final processed scores.

`sample` is the pure function; `Sampler` keeps what some processors need across steps (token
counts for penalties, grammar matchers) keyed by sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from tgserve.params import GrammarSpec, SamplingParams
from tgserve.sampling import processors, watermark
from tgserve.sampling.history import TokenCounts
from tgserve.sampling.tensors import SamplingTensors


@dataclass(frozen=True, slots=True)
class SampledTokens:
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None = None  # per row; [] for a row without top_n_tokens
    top_logprobs: list[list[float]] | None = None
    # prompt logprobs computed this step, by index of the sequence in the plan
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)

    def top(self, row: int) -> tuple[list[list[int]], list[list[float]]]:
        """Row's alternatives shaped as one token's entry of SeqOutput.top_ids / top_logprobs."""
        if self.top_ids is None or not self.top_ids[row]:
            return [], []
        return [self.top_ids[row]], [self.top_logprobs[row]]


@dataclass(frozen=True, slots=True)
class GrammarMask:
    rows: torch.Tensor  # [n] rows constrained this step
    apply: Callable[[torch.Tensor], torch.Tensor]  # [n, vocab] scores → scores with banned tokens -inf


def _on_rows(scores: torch.Tensor, rows: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if rows.numel() == scores.shape[0]:  # rows are always sorted and unique: this is every row
        return fn(scores)
    return scores.index_copy(0, rows, fn(scores.index_select(0, rows)))


def sample(logits: torch.Tensor, t: SamplingTensors, counts: torch.Tensor | None = None,
           grammar: GrammarMask | None = None, watermark_gamma: float = watermark.DEFAULT_GAMMA,
           watermark_delta: float = watermark.DEFAULT_DELTA) -> SampledTokens:
    """logits: [rows, vocab] float32. counts: [penalised rows, vocab] token occurrences."""
    scores = logits
    if t.watermark_rows is not None:
        scores = _on_rows(scores, t.watermark_rows,
                          lambda s: watermark.bias(s, t.previous_tokens, watermark_gamma, watermark_delta))
    if t.penalty_rows is not None:
        scores = _on_rows(scores, t.penalty_rows, lambda s: processors.penalties(
            s, counts, t.repetition_penalty, t.frequency_penalty, t.lengths))
    if grammar is not None:
        scores = _on_rows(scores, grammar.rows, grammar.apply)

    tokens = scores.argmax(dim=-1)
    log_z = torch.logsumexp(scores, dim=-1)
    logprobs = scores.gather(1, tokens[:, None]).squeeze(1) - log_z
    final, final_log_z = scores, log_z
    if t.sample_rows is not None:
        warped = _warp(scores.index_select(0, t.sample_rows), t)
        picked, picked_log_z = _pick(warped, t.uniform)
        tokens = tokens.index_copy(0, t.sample_rows, picked)
        logprobs = logprobs.index_copy(0, t.sample_rows, warped.gather(1, picked[:, None]).squeeze(1) - picked_log_z)
        if t.top_n_rows is not None:
            final = scores.index_copy(0, t.sample_rows, warped)
            final_log_z = log_z.index_copy(0, t.sample_rows, picked_log_z)
    top_ids = top_logprobs = None
    if t.top_n_rows is not None:
        top_ids, top_logprobs = _top_n(final, final_log_z, t)
    return SampledTokens(tokens.tolist(), logprobs.tolist(), top_ids, top_logprobs)


def _warp(scores: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    scores = processors.temperature(scores, t.temperature)
    if t.top_k_rows is not None:
        scores = _on_rows(scores, t.top_k_rows, lambda s: processors.top_k(s, t.top_k))
    if t.top_p_rows is not None:
        scores = _on_rows(scores, t.top_p_rows, lambda s: processors.top_p(s, t.top_p))
    if t.typical_rows is not None:
        scores = _on_rows(scores, t.typical_rows, lambda s: processors.typical_p(s, t.typical_p))
    return scores


def _pick(scores: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF in vocabulary order: the token where the cumulative mass passes u × total."""
    log_z = torch.logsumexp(scores, dim=-1)
    cdf = (scores - log_z[:, None]).exp().cumsum(dim=-1)
    total = cdf[:, -1:]
    # the target stays strictly below the total mass, so the pick is always a token with mass > 0
    target = torch.minimum(uniform.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.contiguous(), right=True).squeeze(1), log_z


def _top_n(scores: torch.Tensor, log_z: torch.Tensor, t: SamplingTensors) -> tuple[list[list[int]], list[list[float]]]:
    """The n best tokens of each asking row by final logprob; every token tied with the n-th is
    included too (as TGI does), tokens with no mass never."""
    rows = t.top_n_rows
    logprobs = scores.index_select(0, rows) - log_z.index_select(0, rows)[:, None]
    best = logprobs.topk(int(t.top_n.max()), dim=-1).values
    nth = best.gather(1, (t.top_n - 1)[:, None])
    nth = torch.where(torch.isfinite(nth), nth, torch.finfo(nth.dtype).min)
    counts = (logprobs >= nth).sum(dim=-1)
    values, ids = logprobs.topk(int(counts.max()), dim=-1)
    counts, values, ids = counts.tolist(), values.tolist(), ids.tolist()
    top_ids: list[list[int]] = [[] for _ in range(t.num_rows)]
    top_logprobs: list[list[float]] = [[] for _ in range(t.num_rows)]
    for j, row in enumerate(rows.tolist()):  # list slicing of the few results, not tensor work
        top_ids[row], top_logprobs[row] = ids[j][:counts[j]], values[j][:counts[j]]
    return top_ids, top_logprobs


class SequenceView(Protocol):
    """What the sampler reads of an engine sequence."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    num_prompt_tokens: int


class GrammarBackend(Protocol):
    def begin(self, request_id: str, spec: GrammarSpec, generated: list[int]) -> None: ...
    def start(self, seqs: list[SequenceView]) -> "PendingGrammar | None": ...
    def accept(self, seqs: list[SequenceView], tokens: list[int]) -> None: ...
    def release(self, request_ids: list[str]) -> None: ...


class PendingGrammar(Protocol):
    def result(self) -> GrammarMask: ...


@dataclass(slots=True)
class PreparedStep:
    """A step's sampling inputs, built before the forward pass (grammar masks compute meanwhile)."""

    seqs: list[SequenceView]
    tensors: SamplingTensors
    count_rows: torch.Tensor | None
    grammar: PendingGrammar | None


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, grammar: GrammarBackend | None = None,
                 watermark_gamma: float = watermark.DEFAULT_GAMMA, watermark_delta: float = watermark.DEFAULT_DELTA):
        self.device = device
        self.counts = TokenCounts(vocab_size, device)
        self.grammar = grammar
        self.watermark_gamma, self.watermark_delta = watermark_gamma, watermark_delta

    def begin(self, request_id: str, sampling: SamplingParams, generated: list[int]) -> None:
        """A request arrived: start what its processors need before it first samples."""
        if sampling.grammar is not None:
            if self.grammar is None:
                raise ValueError("this engine has no grammar support")
            self.grammar.begin(request_id, sampling.grammar, generated)

    def prepare(self, seqs: list[SequenceView]) -> PreparedStep:
        params = [s.sampling for s in seqs]
        tensors = SamplingTensors.build(params, [len(s.token_ids) for s in seqs], self.device,
                                        [s.token_ids[-1] for s in seqs])
        count_rows = None
        if tensors.penalty_rows is not None:
            penalised = [seqs[i] for i in tensors.penalty_rows.tolist()]
            count_rows = self.counts.rows([s.request_id for s in penalised], [s.token_ids for s in penalised])
        pending = None
        if self.grammar is not None and any(p.grammar is not None for p in params):
            pending = self.grammar.start(seqs)
        return PreparedStep(seqs, tensors, count_rows, pending)

    def sample(self, logits: torch.Tensor, step: PreparedStep) -> SampledTokens:
        counts = self.counts.table.index_select(0, step.count_rows) if step.count_rows is not None else None
        grammar = step.grammar.result() if step.grammar is not None else None
        out = sample(logits, step.tensors, counts, grammar, self.watermark_gamma, self.watermark_delta)
        if step.count_rows is not None:
            chosen = torch.tensor(out.token_ids, device=self.device).index_select(0, step.tensors.penalty_rows)
            self.counts.add(step.count_rows, chosen)
        if grammar is not None:
            self.grammar.accept(step.seqs, out.token_ids)
        return out

    def release(self, request_ids: list[str]) -> None:
        self.counts.release(request_ids)
        if self.grammar is not None:
            self.grammar.release(request_ids)
