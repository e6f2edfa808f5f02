"""The green-list watermark of Kirchenbauer et al. (2023, arXiv 2301.10226), and its detector.

The previous token seeds a pseudo-random split of the vocabulary: a `gamma` fraction of it is
"green", and generation adds `delta` to the green tokens' logits, so watermarked text holds more
green tokens than chance. The detector counts them and reports a z-score.

The split is a keyed hash of (previous token, candidate token) compared with gamma — each token is
green with probability gamma, independently — rather than a seeded permutation per row, so a whole
batch's green lists are one elementwise tensor expression. TGI seeds its permutation with
15485863 × previous token; the same key enters the hash here. Defaults: gamma 0.5, delta 2.0
(TGI's WATERMARK_GAMMA / WATERMARK_DELTA).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

HASH_KEY = 15485863
DEFAULT_GAMMA = 0.5
DEFAULT_DELTA = 2.0
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), in int64 without overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def green(previous: torch.Tensor, candidates: torch.Tensor, gamma: float) -> torch.Tensor:
    """Whether each candidate token is green after its previous token; shapes broadcast."""
    key = _mix32(_mul32(previous.long() & _M32, HASH_KEY))
    h = _mix32((key + _mul32(candidates.long() & _M32, 0x9E3779B9)) & _M32)
    return h < int(gamma * (1 << 32))


def bias(scores: torch.Tensor, previous: torch.Tensor, gamma: float, delta: float) -> torch.Tensor:
    """scores: [n, vocab]; previous: [n]. Adds delta to each row's green tokens."""
    vocab = torch.arange(scores.shape[1], device=scores.device)
    mask = green(previous[:, None], vocab[None, :], gamma)
    return scores + mask.to(scores.dtype) * delta


def green_count(token_ids: Sequence[int], previous: int, gamma: float = DEFAULT_GAMMA) -> int:
    """How many of `token_ids` are green; `previous` is the token before the first one."""
    if not token_ids:
        return 0
    tokens = torch.tensor(list(token_ids), dtype=torch.long)
    before = torch.cat([torch.tensor([previous], dtype=torch.long), tokens[:-1]])
    return int(green(before, tokens, gamma).sum())


def z_score_of(green_tokens: int, total: int, gamma: float = DEFAULT_GAMMA) -> float:
    """Standard deviations by which `green_tokens` of `total` exceed chance (gamma × total)."""
    return (green_tokens - gamma * total) / math.sqrt(total * gamma * (1 - gamma)) if total else 0.0


def z_score(token_ids: Sequence[int], previous: int, gamma: float = DEFAULT_GAMMA) -> float:
    """Detector: how far the count of green tokens in `token_ids` is above chance, in standard
    deviations. `previous` is the token before the first one (the prompt's last). Under the null
    hypothesis (text written without the watermark) the z-score is about standard normal."""
    return z_score_of(green_count(token_ids, previous, gamma), len(token_ids), gamma)
