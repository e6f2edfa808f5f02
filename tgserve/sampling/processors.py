"""Logits processors, each over the rows that use it, with its own value per row.

Every function takes scores `[n, vocab]` (only the rows that use the processor) and a per-row
parameter column `[n]`, and returns new scores; a row's result never depends on the other rows.
Semantics are transformers' (which TGI follows): top-k keeps every token tied with the k-th
score; top-p keeps the smallest set of best tokens holding `top_p` mass; typical-p keeps the
tokens whose surprise is closest to the entropy until they hold `typical_p` mass.

Top-p and typical-p need tokens in an order; a full sort of a 49k vocabulary costs far more than
the rest of the step, so they first look at a few hundred candidates (`topk`) and only sort the
rows whose cut falls beyond them.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
CANDIDATES = 256  # tokens looked at before falling back to a full sort of the row


def temperature(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return scores / t[:, None]


def top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """k: [n] int ≥ 1."""
    k = k.clamp(max=scores.shape[1])
    largest = scores.topk(int(k.max()), dim=-1).values  # [n, max k], descending
    kth = largest.gather(1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, NEG_INF)


def _ordered_prefix(keys: torch.Tensor, probs: torch.Tensor, mass: torch.Tensor,
                    include_reaching: bool) -> torch.Tensor:
    """Per row, the key of the last token kept when walking tokens by ascending `keys` and
    keeping them while the mass before them is < `mass` (`include_reaching`) or while the mass
    including them is < `mass` plus one more (typical-p's rule). Returns [n, 1] thresholds: a token
    is kept iff its key ≤ the threshold."""
    n, vocab = keys.shape
    cand = min(vocab, CANDIDATES)
    cand_keys, order = keys.topk(cand, dim=-1, largest=False)  # ascending keys
    cand_probs = probs.gather(1, order)
    cum = cand_probs.cumsum(dim=-1)
    count = ((cum - cand_probs) < mass[:, None]).sum(-1) if include_reaching else (cum < mass[:, None]).sum(-1) + 1
    count = count.clamp(1, cand)
    threshold = cand_keys.gather(1, (count - 1)[:, None])
    # the cut is inside the candidates unless they were all kept and more tokens exist
    beyond = (count == cand) & (cand < vocab)
    if bool(beyond.any()):
        rows = beyond.nonzero().squeeze(1)
        full_keys, full_order = keys[rows].sort(dim=-1)
        full_probs = probs[rows].gather(1, full_order)
        cum = full_probs.cumsum(dim=-1)
        m = mass[rows][:, None]
        full_count = ((cum - full_probs) < m).sum(-1) if include_reaching else (cum < m).sum(-1) + 1
        full_count = full_count.clamp(1, vocab)
        threshold[rows] = full_keys.gather(1, (full_count - 1)[:, None])
    return threshold


def top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """p: [n] in (0, 1). Keeps the best tokens until the mass before the next one reaches p."""
    probs = scores.softmax(dim=-1)
    threshold = _ordered_prefix(-probs, probs, p, include_reaching=True)  # keys: best first
    return scores.masked_fill(-probs > threshold, NEG_INF)


def typical_p(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """mass: [n] in (0, 1). transformers' TypicalLogitsWarper, one mass per row."""
    logp = scores.log_softmax(dim=-1)
    probs = logp.exp()
    entropy = -(logp * probs).nansum(dim=-1, keepdim=True)
    surprise_gap = (-logp - entropy).abs()  # inf for tokens already removed
    threshold = _ordered_prefix(surprise_gap, probs, mass, include_reaching=False)
    return scores.masked_fill(surprise_gap > threshold, NEG_INF)


def penalties(scores: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor,
              frequency: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """TGI's repetition penalty (CTRL: a seen token's logit is divided by the penalty when positive,
    multiplied when negative) then frequency penalty (logit -= penalty * count / length), over
    prompt and generated tokens. counts: [n, vocab] occurrences; a 1.0 / 0.0 value is exact identity."""
    seen = counts > 0
    r = repetition[:, None]
    scores = torch.where(seen, torch.where(scores < 0, scores * r, scores / r), scores)
    return scores - frequency[:, None] * (counts / lengths[:, None])
