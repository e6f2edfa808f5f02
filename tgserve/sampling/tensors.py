"""Per-row sampling parameters as columns, built once per step from the rows that sample.

Randomness is counter-based: a sampled row's uniform draw is a hash of (seed, position), so a seed
gives the same tokens whatever else is in the batch, and a resumed sequence continues the same
stream. Each processor gets the indices of the rows that use it (None when no row does), so rows
that do not use it are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgserve.params import SamplingParams


def uniform_from(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, position) → float64 in [0, 1). Vectorised; uint64 arithmetic wraps."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) ^ (positions.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _rows(flags: list[bool], device: torch.device) -> torch.Tensor | None:
    """Indices of the rows whose flag is set; None when there are none."""
    picked = [i for i, f in enumerate(flags) if f]
    return torch.tensor(picked, dtype=torch.long, device=device) if picked else None


@dataclass(frozen=True, slots=True)
class SamplingTensors:
    """Columns over all rows ([rows]) or over the rows of one feature ([n] beside its `*_rows`)."""

    num_rows: int
    # rows that sample (the warpers only ever see these rows)
    sample_rows: torch.Tensor | None
    temperature: torch.Tensor | None  # [n sampled]
    uniform: torch.Tensor | None  # [n sampled] float64 draw
    top_k_rows: torch.Tensor | None  # positions within the sampled rows
    top_k: torch.Tensor | None
    top_p_rows: torch.Tensor | None
    top_p: torch.Tensor | None
    typical_rows: torch.Tensor | None
    typical_p: torch.Tensor | None
    # processors every row may use (greedy or sampled): positions within all rows
    penalty_rows: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    lengths: torch.Tensor | None  # [n penalised] tokens so far (frequency is count / length)
    watermark_rows: torch.Tensor | None
    previous_tokens: torch.Tensor | None  # [n watermarked] the token before the one being chosen
    top_n_rows: torch.Tensor | None
    top_n: torch.Tensor | None
    # what the sampler may skip
    max_top_k: int

    @property
    def any_sample(self) -> bool:
        return self.sample_rows is not None

    @classmethod
    def build(cls, params: list[SamplingParams], positions: list[int], device: torch.device,
              last_tokens: list[int] | None = None) -> "SamplingTensors":
        """`positions[i]`: index of the token row i is about to produce (its sequence length);
        `last_tokens[i]`: the token before it (needed by watermarked rows)."""
        sampled = [p for p in params if p.do_sample]
        seeds = np.array([p.seed for p in sampled], dtype=np.uint64)
        pos = np.array([n for p, n in zip(params, positions) if p.do_sample], dtype=np.uint64)
        penalised = [i for i, p in enumerate(params) if p.uses_penalty]
        watermarked = [i for i, p in enumerate(params) if p.watermark]
        top_n = [p.top_n_tokens for p in params if p.top_n_tokens > 0]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor | None:
            return torch.tensor(values, dtype=dtype, device=device) if values else None

        top_k = [p.top_k for p in sampled if p.top_k > 0]
        top_p = [p.top_p for p in sampled if p.top_p < 1.0]
        typical = [p.typical_p for p in sampled if p.typical_p < 1.0]
        if watermarked and last_tokens is None:
            raise ValueError("watermarked rows need the previous token of each row")
        return cls(
            num_rows=len(params),
            sample_rows=_rows([p.do_sample for p in params], device),
            temperature=column([p.temperature for p in sampled], torch.float32),
            uniform=torch.from_numpy(uniform_from(seeds, pos)).to(device) if sampled else None,
            top_k_rows=_rows([p.top_k > 0 for p in sampled], device),
            top_k=column(top_k, torch.long),
            top_p_rows=_rows([p.top_p < 1.0 for p in sampled], device),
            top_p=column(top_p, torch.float32),
            typical_rows=_rows([p.typical_p < 1.0 for p in sampled], device),
            typical_p=column(typical, torch.float32),
            penalty_rows=column(penalised, torch.long),
            repetition_penalty=column([params[i].repetition_penalty for i in penalised], torch.float32),
            frequency_penalty=column([params[i].frequency_penalty for i in penalised], torch.float32),
            lengths=column([positions[i] for i in penalised], torch.float32),
            watermark_rows=column(watermarked, torch.long),
            previous_tokens=column([last_tokens[i] for i in watermarked], torch.long) if watermarked else None,
            top_n_rows=_rows([p.top_n_tokens > 0 for p in params], device),
            top_n=column(top_n, torch.long),
            max_top_k=max(top_k, default=0),
        )
