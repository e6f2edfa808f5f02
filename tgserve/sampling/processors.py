"""Logits processors, each over the rows that use it, with its own value per row.

Every function takes scores `[n, vocab]` (only the rows that use the processor) and a per-row
parameter column `[n]`, and returns new scores; a row's result never depends on the other rows.
Semantics are transformers' (which TGI follows): top-k keeps every token tied with the k-th
score; top-p keeps the smallest set of best tokens holding `top_p` mass; typical-p keeps the
tokens whose surprise is closest to the entropy until they hold `typical_p` mass.

Top-p and typical-p need tokens in an order; a full sort of a 49k vocabulary costs far more than
the rest of the step (~60 ms for 32 rows here), so they first look at a few hundred candidates
(a partial `topk`), then at more only for the rows whose cut falls beyond them.
"""

from __future__ import annotations

from typing import Callable

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


def _cut(keys: torch.Tensor, probs_of: "Callable[[torch.Tensor], torch.Tensor]", mass: torch.Tensor,
         inclusive: bool, candidates: int) -> torch.Tensor:
    """Per row, the largest key kept when walking tokens by ascending `keys` while the mass before
    a token is < `mass` (`inclusive`: top-p's rule) or while the mass up to the previous token is <
    `mass` (typical-p's rule: the token that reaches it is kept too). A token is kept iff its key
    ≤ the returned threshold ([n, 1]); ties with the last kept token are kept.

    The walk looks at `candidates` tokens first (a partial top-k), then 16x more for the rows whose
    cut lies further, and sorts the whole row only for those still beyond."""
    vocab = keys.shape[1]
    threshold = torch.empty(keys.shape[0], 1, dtype=keys.dtype, device=keys.device)
    rows = None  # None: every row
    cand = min(vocab, candidates)
    while True:
        sub = keys if rows is None else keys.index_select(0, rows)
        if cand < vocab:
            cand_keys, order = sub.topk(cand, dim=-1, largest=False)  # ascending keys
        else:
            cand_keys, order = sub.sort(dim=-1)
        cand_probs = probs_of(order if rows is None else (rows, order))
        m = (mass if rows is None else mass.index_select(0, rows))[:, None]
        cum = cand_probs.cumsum(dim=-1)
        count = ((cum - cand_probs) < m).sum(-1) if inclusive else (cum < m).sum(-1) + 1
        count = count.clamp(1, cand)
        found = cand_keys.gather(1, (count - 1)[:, None])
        if rows is None:
            threshold = found
        else:
            threshold[rows] = found
        # the cut is inside the candidates unless they were all kept and more tokens exist
        beyond = (count == cand) & (cand < vocab)
        if not bool(beyond.any()):
            return threshold
        picked = beyond.nonzero().squeeze(1)
        rows = picked if rows is None else rows.index_select(0, picked)
        cand = min(vocab, cand * 16)


def top_p(scores: torch.Tensor, p: torch.Tensor, candidates: int = CANDIDATES) -> torch.Tensor:
    """p: [n] in (0, 1). Keeps the best tokens until the mass before the next one reaches p.
    `candidates`: how many best tokens to look at first (e.g. the top-k already applied)."""
    log_z = torch.logsumexp(scores, dim=-1, keepdim=True)

    def probs_of(index) -> torch.Tensor:
        if isinstance(index, tuple):
            rows, order = index
            return (scores.index_select(0, rows).gather(1, order) - log_z.index_select(0, rows)).exp()
        return (scores.gather(1, index) - log_z).exp()

    threshold = _cut(-scores, probs_of, p, inclusive=True, candidates=candidates)  # keys: best first
    return scores.masked_fill(scores < -threshold, NEG_INF)


def typical_p(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """mass: [n] in (0, 1). transformers' TypicalLogitsWarper, one mass per row."""
    logp = scores.log_softmax(dim=-1)
    probs = logp.exp()
    entropy = -(logp * probs).nansum(dim=-1, keepdim=True)
    surprise_gap = (-logp - entropy).abs()  # inf for tokens already removed

    def probs_of(index) -> torch.Tensor:
        if isinstance(index, tuple):
            rows, order = index
            return probs.index_select(0, rows).gather(1, order)
        return probs.gather(1, index)

    threshold = _cut(surprise_gap, probs_of, mass, inclusive=False, candidates=CANDIDATES)
    return scores.masked_fill(surprise_gap > threshold, NEG_INF)


def penalties(scores: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              repetition: torch.Tensor, frequency: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """TGI's repetition penalty (CTRL: a seen token's logit is divided by the penalty when positive,
    multiplied when negative) then frequency penalty (logit -= penalty * count / length), over
    prompt and generated tokens. `seen`: flat (row, token, count) of every token each row has seen;
    only those logits change, so the work is a few hundred tokens per row, not the vocabulary.
    `scores` is updated in place (and returned)."""
    rows, tokens, counts = seen
    logits = scores[rows, tokens]
    r = repetition.index_select(0, rows)
    logits = torch.where(logits < 0, logits * r, logits / r)
    logits -= frequency.index_select(0, rows) * counts / lengths.index_select(0, rows)
    scores[rows, tokens] = logits
    return scores


def output_penalties(scores: torch.Tensor, seen: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logit -= frequency * count + presence, for each token the row has
    generated (`seen` counts generated tokens only). In place."""
    rows, tokens, counts = seen
    scores[rows, tokens] -= frequency.index_select(0, rows) * counts + presence.index_select(0, rows)
    return scores


def logit_bias(scores: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """OpenAI's logit_bias: add each (row, token)'s bias; ids past the vocabulary are ignored. In place."""
    inside = tokens < scores.shape[1]
    return scores.index_put_((rows[inside], tokens[inside]), bias[inside], accumulate=True)
