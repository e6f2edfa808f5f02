"""Logits warpers over the rows that sample, each row with its own setting, in TGI's order.

Each warper works in vocabulary order and leaves rows that do not use it untouched, so a row's
result never depends on what else is in the batch. Semantics are transformers': top-k keeps every
token tied with the k-th score; top-p keeps the smallest set of best tokens holding `top_p` mass.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def temperature(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return scores / t[:, None]


def top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """k: [rows] int, 0 = off."""
    vocab = scores.shape[1]
    k = torch.where(k > 0, k.clamp(max=vocab), vocab)
    largest = scores.topk(int(k.max()), dim=-1).values  # [rows, max k], descending
    kth = largest.gather(1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """p: [rows] float, 1.0 = off."""
    probs = scores.softmax(dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the better-ranked tokens
    keep = (mass_before < p[:, None]).sum(dim=-1).clamp(min=1)  # tokens kept per row (never none)
    smallest_kept = sorted_probs.gather(1, (keep - 1)[:, None])
    drop = (probs < smallest_kept) & (p < 1.0)[:, None]
    return scores.masked_fill(drop, NEG_INF)
