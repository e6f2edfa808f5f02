"""Per-row sampling parameters as columns, built once per step from the rows that sample.

Randomness is counter-based: a sampled row's uniform draw is a hash of (seed, position), so a seed
gives the same tokens whatever else is in the batch, and a resumed sequence continues the same
stream. Columns span all rows (with each feature's identity value where a row does not use it);
each processor and each way of choosing gets the indices of its rows (None when there are none),
so rows that do not use it are never touched. Which group a row lands in depends on its own
parameters only, never on its neighbours.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from tgserve.params import SamplingParams

# Sampled rows with top_k at most 256 choose among their best 64 or 256 tokens only (a [rows, 64]
# problem instead of [rows, vocab]); the others go through the whole vocabulary. The width follows
# from the row's own top_k, so a row computes the same thing whatever shares its step.
CANDIDATE_WIDTHS = (64, 256)


def candidate_width(p: SamplingParams) -> int | None:
    if p.do_sample and p.top_k > 0:
        return next((w for w in CANDIDATE_WIDTHS if p.top_k <= w), None)
    return None


def uniform_from(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, position) → float64 in [0, 1). Vectorised; uint64 arithmetic wraps."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) ^ (positions.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True, slots=True)
class SamplingTensors:
    """Columns over all rows ([rows]); `*_rows` are sorted row indices, None when empty."""

    num_rows: int
    temperature: torch.Tensor  # float32, 1.0 = off
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor  # float32, 1.0 = off
    typical_p: torch.Tensor  # float32, 1.0 = off
    uniform: torch.Tensor  # float64 draw (0 for greedy rows)
    top_n: torch.Tensor  # int64, 0 = off
    # how each row chooses
    greedy_rows: torch.Tensor | None
    candidate_rows: tuple[tuple[int, torch.Tensor], ...]  # (width, rows): sampled among the best `width`
    vocab_rows: torch.Tensor | None  # sampled over the whole vocabulary
    # processors every row may use (greedy or sampled), with their columns over those rows
    penalty_rows: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    lengths: torch.Tensor | None  # tokens so far (frequency is count / length)
    output_penalty_rows: torch.Tensor | None  # OpenAI's presence / frequency penalties
    output_frequency: torch.Tensor | None
    output_presence: torch.Tensor | None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # flat (row, token, bias) of logit_bias
    watermark_rows: torch.Tensor | None
    previous_tokens: torch.Tensor | None  # the token before the one being chosen
    top_n_rows: torch.Tensor | None

    @property
    def any_sample(self) -> bool:
        return bool(self.candidate_rows) or self.vocab_rows is not None

    @classmethod
    def build(cls, params: list[SamplingParams], positions: list[int], device: torch.device,
              last_tokens: list[int] | None = None) -> "SamplingTensors":
        """`positions[i]`: index of the token row i is about to produce (its sequence length);
        `last_tokens[i]`: the token before it (needed by watermarked rows)."""

        if all(_plain_greedy(p) for p in params):  # the common case: the same columns every step
            return _greedy_columns(len(params), device)

        def rows(picked: list[int]) -> torch.Tensor | None:
            return torch.tensor(picked, dtype=torch.long, device=device) if picked else None

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        sampled = [i for i, p in enumerate(params) if p.do_sample]
        seeds = np.array([params[i].seed for i in sampled], dtype=np.uint64)
        uniform = np.zeros(len(params))
        uniform[sampled] = uniform_from(seeds, np.array([positions[i] for i in sampled], dtype=np.uint64))
        widths = [candidate_width(p) for p in params]
        penalised = [i for i, p in enumerate(params) if p.uses_penalty]
        output_penalised = [i for i, p in enumerate(params) if p.uses_output_penalty]
        biased = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias]
        watermarked = [i for i, p in enumerate(params) if p.watermark]
        if watermarked and last_tokens is None:
            raise ValueError("watermarked rows need the previous token of each row")
        return cls(
            num_rows=len(params),
            temperature=column([p.temperature if p.do_sample else 1.0 for p in params], torch.float32),
            top_k=column([p.top_k if p.do_sample else 0 for p in params], torch.long),
            top_p=column([p.top_p if p.do_sample else 1.0 for p in params], torch.float32),
            typical_p=column([p.typical_p if p.do_sample else 1.0 for p in params], torch.float32),
            uniform=torch.from_numpy(uniform).to(device),
            top_n=column([p.top_n_tokens for p in params], torch.long),
            greedy_rows=rows([i for i, p in enumerate(params) if not p.do_sample]),
            candidate_rows=tuple((w, rows(group)) for w, group in (
                (w, [i for i in sampled if widths[i] == w]) for w in CANDIDATE_WIDTHS) if group),
            vocab_rows=rows([i for i in sampled if widths[i] is None]),
            penalty_rows=rows(penalised),
            repetition_penalty=column([params[i].repetition_penalty for i in penalised], torch.float32)
            if penalised else None,
            frequency_penalty=column([params[i].frequency_penalty for i in penalised], torch.float32)
            if penalised else None,
            lengths=column([positions[i] for i in penalised], torch.float32) if penalised else None,
            output_penalty_rows=rows(output_penalised),
            output_frequency=column([params[i].output_frequency_penalty for i in output_penalised], torch.float32)
            if output_penalised else None,
            output_presence=column([params[i].output_presence_penalty for i in output_penalised], torch.float32)
            if output_penalised else None,
            bias=(column([b[0] for b in biased], torch.long), column([b[1] for b in biased], torch.long),
                  column([b[2] for b in biased], torch.float32)) if biased else None,
            watermark_rows=rows(watermarked),
            previous_tokens=column([last_tokens[i] for i in watermarked], torch.long) if watermarked else None,
            top_n_rows=rows([i for i, p in enumerate(params) if p.top_n_tokens > 0]),
        )


def _plain_greedy(p: SamplingParams) -> bool:
    return not (p.do_sample or p.uses_penalty or p.uses_output_penalty or p.logit_bias or p.watermark
                or p.top_n_tokens)


@functools.lru_cache(maxsize=256)
def _greedy_columns(num_rows: int, device: torch.device) -> SamplingTensors:
    """What `build` makes for rows that all choose greedily with nothing else on: kept per row
    count (the columns are only read)."""
    def column(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((num_rows,), value, dtype=dtype, device=device)

    return SamplingTensors(
        num_rows=num_rows, temperature=column(1.0, torch.float32), top_k=column(0, torch.long),
        top_p=column(1.0, torch.float32), typical_p=column(1.0, torch.float32),
        uniform=column(0.0, torch.float64), top_n=column(0, torch.long),
        greedy_rows=torch.arange(num_rows, device=device), candidate_rows=(), vocab_rows=None,
        penalty_rows=None, repetition_penalty=None, frequency_penalty=None, lengths=None,
        output_penalty_rows=None, output_frequency=None, output_presence=None, bias=None,
        watermark_rows=None, previous_tokens=None, top_n_rows=None,
    )
