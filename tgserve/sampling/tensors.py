"""Per-row sampling parameters as columns, built once per step from the rows that sample.

Randomness is counter-based: a sampled row's uniform draw is a hash of (seed, position), so a seed
gives the same tokens whatever else is in the batch, and a resumed sequence continues the same
stream. Features no row uses are flagged off so the sampler can skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgserve.params import SamplingParams

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


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
    do_sample: torch.Tensor  # [rows] bool
    sample_rows: torch.Tensor  # [n] indices of rows that sample
    temperature: torch.Tensor  # [n] for the sampled rows
    top_k: torch.Tensor  # [n] int64, 0 = off
    top_p: torch.Tensor  # [n] float, 1.0 = off
    uniform: torch.Tensor  # [n] float64 draw per sampled row
    any_sample: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, params: list[SamplingParams], positions: list[int], device: torch.device) -> "SamplingTensors":
        """`positions[i]`: index of the token row i is about to produce (its sequence length)."""
        sample_rows = [i for i, p in enumerate(params) if p.do_sample]
        picked = [params[i] for i in sample_rows]
        seeds = np.array([p.seed for p in picked], dtype=np.uint64)
        pos = np.array([positions[i] for i in sample_rows], dtype=np.uint64)
        return cls(
            do_sample=torch.tensor([p.do_sample for p in params], dtype=torch.bool, device=device),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
            temperature=torch.tensor([p.temperature for p in picked], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in picked], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in picked], dtype=torch.float32, device=device),
            uniform=torch.from_numpy(uniform_from(seeds, pos)).to(device),
            any_sample=bool(picked),
            any_top_k=any(p.top_k > 0 for p in picked),
            any_top_p=any(p.top_p < 1.0 for p in picked),
        )
