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

import functools
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from tgserve.layers import cpu_kernels
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
    """`fn` over some rows of `scores` (written back in place: the sampler owns its scores)."""
    if rows.numel() == scores.shape[0]:  # rows are always sorted and unique: this is every row
        return fn(scores)
    return scores.index_copy_(0, rows, fn(scores.index_select(0, rows)))


@dataclass(frozen=True, slots=True)
class _Choice:
    """What a group of rows chose: tokens and their logprobs, and the final log-softmax the
    top-n alternatives come from (over `ids`, or over the vocabulary when `ids` is None)."""

    tokens: torch.Tensor  # [m]
    logprobs: torch.Tensor  # [m]
    final: torch.Tensor | None  # [m, width], only when a row of the group wants top-n
    ids: torch.Tensor | None  # [m, width] token id of each column


def sample(logits: torch.Tensor, t: SamplingTensors, seen: tuple[torch.Tensor, ...] | None = None,
           grammar: GrammarMask | None = None, watermark_gamma: float = watermark.DEFAULT_GAMMA,
           watermark_delta: float = watermark.DEFAULT_DELTA,
           seen_output: tuple[torch.Tensor, ...] | None = None) -> SampledTokens:
    """logits: [rows, vocab] float32, owned by the call (processors may write into it).
    seen: flat (penalised row, token, count) of the tokens each penalised row has seen;
    seen_output: the same over generated tokens, for the rows with OpenAI's penalties."""
    scores = logits
    if t.watermark_rows is not None:
        scores = _on_rows(scores, t.watermark_rows,
                          lambda s: watermark.bias(s, t.previous_tokens, watermark_gamma, watermark_delta))
    if t.penalty_rows is not None:
        scores = _on_rows(scores, t.penalty_rows, lambda s: processors.penalties(
            s, seen, t.repetition_penalty, t.frequency_penalty, t.lengths))
    if t.output_penalty_rows is not None:
        scores = _on_rows(scores, t.output_penalty_rows, lambda s: processors.output_penalties(
            s, seen_output, t.output_frequency, t.output_presence))
    if t.bias is not None:
        scores = processors.logit_bias(scores, *t.bias)
    if grammar is not None:
        scores = _on_rows(scores, grammar.rows, grammar.apply)

    tokens = logprobs = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    if t.top_n_rows is not None:
        top_ids, top_logprobs = [[] for _ in range(t.num_rows)], [[] for _ in range(t.num_rows)]
    groups = [(t.greedy_rows, _greedy), (t.vocab_rows, _sample_vocab),
              *((rows, functools.partial(_sample_candidates, width=w)) for w, rows in t.candidate_rows)]
    for rows, choose in groups:
        if rows is None:
            continue
        whole = rows.numel() == t.num_rows
        sub = scores if whole else scores.index_select(0, rows)
        top_n = t.top_n if whole else t.top_n.index_select(0, rows)
        choice = choose(sub, t, rows, t.top_n_rows is not None and bool((top_n > 0).any()))
        if whole:  # one group holds every row (rows = 0..n-1, in order)
            tokens, logprobs = choice.tokens, choice.logprobs.float()
        else:
            if tokens is None:
                tokens = torch.zeros(t.num_rows, dtype=torch.long, device=scores.device)
                logprobs = torch.zeros(t.num_rows, dtype=torch.float32, device=scores.device)
            tokens.index_copy_(0, rows, choice.tokens)
            logprobs.index_copy_(0, rows, choice.logprobs)
        if choice.final is not None:
            _top_n(choice, top_n, rows.tolist(), top_ids, top_logprobs)
    if tokens is None:  # no rows
        return SampledTokens([], [], top_ids, top_logprobs)
    return SampledTokens(tokens.tolist(), logprobs.tolist(), top_ids, top_logprobs)


def _greedy(scores: torch.Tensor, t: SamplingTensors, rows: torch.Tensor, want_final: bool) -> _Choice:
    if not want_final and (native := cpu_kernels.greedy(scores)) is not None:
        return _Choice(*native, None, None)  # the same choice and logprob, one pass over the logits
    tokens = scores.argmax(dim=-1)
    log_z = torch.logsumexp(scores, dim=-1)
    chosen = scores.gather(1, tokens[:, None]).squeeze(1) - log_z
    return _Choice(tokens, chosen, scores - log_z[:, None] if want_final else None, None)


def _sample_vocab(scores: torch.Tensor, t: SamplingTensors, rows: torch.Tensor, want_final: bool) -> _Choice:
    warped = _warp(scores, _columns(t, rows))
    position, log_z = _pick(warped, t.uniform.index_select(0, rows))
    chosen = warped.gather(1, position[:, None]).squeeze(1) - log_z
    return _Choice(position, chosen, warped - log_z[:, None] if want_final else None, None)


def _sample_candidates(scores: torch.Tensor, t: SamplingTensors, rows: torch.Tensor, want_final: bool,
                       width: int) -> _Choice:
    """Rows with a small top_k: only their `width` best tokens can survive top-k, so the warpers
    and the pick run on those (in vocabulary order), the same computation as over the whole
    vocabulary with every other token at -inf."""
    width = min(width, scores.shape[1])
    values, ids = scores.topk(width, dim=-1)  # descending
    if width < scores.shape[1]:
        # a k-th score tied past the candidates would keep more tokens than they hold: such a row
        # (its own values decide, never its neighbours') takes the whole-vocabulary path
        kth = values.gather(1, (t.top_k.index_select(0, rows) - 1)[:, None])
        # (a -inf k-th score means fewer than k tokens are left, e.g. by a grammar: all are in)
        spill = (values[:, -1:] >= kth) & torch.isfinite(kth)
        if bool(spill.any()):
            return _split(scores, t, rows, spill.squeeze(1), want_final, width)
    ids, order = ids.sort(dim=-1)  # vocabulary order, as the pick walks it
    values = values.gather(1, order)
    warped = _warp(values, _columns(t, rows))
    position, log_z = _pick(warped, t.uniform.index_select(0, rows))
    chosen = warped.gather(1, position[:, None]).squeeze(1) - log_z
    tokens = ids.gather(1, position[:, None]).squeeze(1)
    return _Choice(tokens, chosen, warped - log_z[:, None] if want_final else None, ids)


def _split(scores, t, rows, spill, want_final, width) -> _Choice:
    """Candidate rows of which some spill: those go over the vocabulary, the rest stay."""
    parts = []
    for mask, choose in ((spill, _sample_vocab), (~spill, functools.partial(_sample_candidates, width=width))):
        picked = mask.nonzero().squeeze(1)
        if picked.numel():
            parts.append((picked, choose(scores.index_select(0, picked), t, rows.index_select(0, picked), want_final)))
    tokens = torch.empty(len(rows), dtype=torch.long, device=scores.device)
    logprobs = torch.empty(len(rows), dtype=torch.float32, device=scores.device)
    final = ids = None
    if want_final:
        final = torch.full((len(rows), scores.shape[1]), float("-inf"), device=scores.device)
        ids = torch.arange(scores.shape[1], device=scores.device).expand(len(rows), -1).clone()
    for picked, choice in parts:
        tokens[picked], logprobs[picked] = choice.tokens, choice.logprobs
        if want_final:
            width = choice.final.shape[1]
            final[picked, :width] = choice.final
            if choice.ids is not None:
                ids[picked, :width] = choice.ids
                final[picked, width:] = float("-inf")
    return _Choice(tokens, logprobs, final, ids)


@dataclass(frozen=True, slots=True)
class _Columns:
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    typical_p: torch.Tensor


def _columns(t: SamplingTensors, rows: torch.Tensor) -> _Columns:
    return _Columns(t.temperature.index_select(0, rows), t.top_k.index_select(0, rows),
                    t.top_p.index_select(0, rows), t.typical_p.index_select(0, rows))


def _warp(scores: torch.Tensor, c: _Columns) -> torch.Tensor:
    """temperature → top-k → top-p → typical-p, each over the rows that use it."""
    scores = processors.temperature(scores, c.temperature)
    for values, used, fn in ((c.top_k, c.top_k > 0, processors.top_k), (c.top_p, c.top_p < 1.0, processors.top_p),
                             (c.typical_p, c.typical_p < 1.0, processors.typical_p)):
        if bool(used.all()):
            scores = fn(scores, values)
        elif bool(used.any()):
            rows = used.nonzero().squeeze(1)
            scores = _on_rows(scores, rows, lambda s: fn(s, values.index_select(0, rows)))
    return scores


def _pick(scores: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF in column order: the column where the cumulative mass passes u × total."""
    log_z = torch.logsumexp(scores, dim=-1)
    cdf = (scores - log_z[:, None]).exp().cumsum(dim=-1)
    total = cdf[:, -1:]
    # the target stays strictly below the total mass, so the pick is always a token with mass > 0
    target = torch.minimum(uniform.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.contiguous(), right=True).squeeze(1), log_z


def _top_n(choice: _Choice, top_n: torch.Tensor, rows: list[int], top_ids: list[list[int]],
           top_logprobs: list[list[float]]) -> None:
    """The n best tokens of each asking row by final logprob; every token tied with the n-th is
    included too (as TGI does), tokens with no mass never."""
    asking = (top_n > 0).nonzero().squeeze(1)
    logprobs = choice.final.index_select(0, asking)
    n = top_n.index_select(0, asking)
    best = logprobs.topk(int(n.max()), dim=-1).values
    nth = best.gather(1, (n - 1)[:, None])
    nth = torch.where(torch.isfinite(nth), nth, torch.finfo(nth.dtype).min)
    counts = (logprobs >= nth).sum(dim=-1)
    values, columns = logprobs.topk(int(counts.max()), dim=-1)
    ids = columns if choice.ids is None else choice.ids.index_select(0, asking).gather(1, columns)
    counts, values, ids = counts.tolist(), values.tolist(), ids.tolist()
    for j, row in enumerate(asking.tolist()):  # list slicing of the few results, not tensor work
        top_ids[rows[row]], top_logprobs[rows[row]] = ids[j][:counts[j]], values[j][:counts[j]]


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
    output_count_rows: torch.Tensor | None
    grammar: PendingGrammar | None


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, grammar: GrammarBackend | None = None,
                 watermark_gamma: float = watermark.DEFAULT_GAMMA, watermark_delta: float = watermark.DEFAULT_DELTA):
        self.device = device
        self.counts = TokenCounts(vocab_size, device)  # prompt + generated (TGI's penalties)
        self.output_counts = TokenCounts(vocab_size, device)  # generated only (OpenAI's penalties)
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
        output_count_rows = None
        if tensors.output_penalty_rows is not None:
            penalised = [seqs[i] for i in tensors.output_penalty_rows.tolist()]
            output_count_rows = self.output_counts.rows([s.request_id for s in penalised],
                                                        [s.token_ids[s.num_prompt_tokens:] for s in penalised])
        pending = None
        if self.grammar is not None and any(p.grammar is not None for p in params):
            pending = self.grammar.start(seqs)
        return PreparedStep(seqs, tensors, count_rows, output_count_rows, pending)

    def sample(self, logits: torch.Tensor, step: PreparedStep) -> SampledTokens:
        seen = self.counts.seen(step.count_rows) if step.count_rows is not None else None
        seen_output = self.output_counts.seen(step.output_count_rows) if step.output_count_rows is not None else None
        grammar = step.grammar.result() if step.grammar is not None else None
        out = sample(logits, step.tensors, seen, grammar, self.watermark_gamma, self.watermark_delta, seen_output)
        if step.count_rows is not None or step.output_count_rows is not None:
            chosen = torch.tensor(out.token_ids, device=self.device)
            if step.count_rows is not None:
                self.counts.add(step.count_rows, chosen.index_select(0, step.tensors.penalty_rows))
            if step.output_count_rows is not None:
                self.output_counts.add(step.output_count_rows, chosen.index_select(0, step.tensors.output_penalty_rows))
        if grammar is not None:
            self.grammar.accept(step.seqs, out.token_ids)
        return out

    def release(self, request_ids: list[str]) -> None:
        self.counts.release(request_ids)
        self.output_counts.release(request_ids)
        if self.grammar is not None:
            self.grammar.release(request_ids)
