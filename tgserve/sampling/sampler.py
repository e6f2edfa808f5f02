"""Choose each row's next token from its logits, all rows at once, and report its logprob.

Greedy rows take the argmax of the raw logits. Sampled rows apply temperature, then top-k, then
top-p (TGI's order and transformers' semantics), and pick by inverse CDF with their counter-based
uniform draw. The reported logprob is the log-softmax of the final processed scores at the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tgserve.sampling.tensors import SamplingTensors


@dataclass(frozen=True, slots=True)
class SampledTokens:
    token_ids: list[int]
    logprobs: list[float]


def sample(logits: torch.Tensor, t: SamplingTensors) -> SampledTokens:
    """logits: [rows, vocab] float32."""
    lse = torch.logsumexp(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1) - lse
    if t.any_sample:
        picked, picked_lp = _sample_rows(logits.index_select(0, t.sample_rows), t)
        tokens = tokens.index_copy(0, t.sample_rows, picked)
        logprobs = logprobs.index_copy(0, t.sample_rows, picked_lp)
    return SampledTokens(tokens.tolist(), logprobs.tolist())


def _sample_rows(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits / t.temperature[:, None]
    order = None
    if t.any_top_k or t.any_top_p:
        scores, order = scores.sort(dim=-1, descending=True)
        if t.any_top_k:
            rank = torch.arange(scores.shape[1], device=scores.device)
            k = torch.where(t.top_k > 0, t.top_k, scores.shape[1])
            scores = scores.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
        if t.any_top_p:
            probs = scores.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens
            # drop a token once the better ones already hold top_p of the mass (never the first)
            drop = mass_before >= t.top_p[:, None]
            drop[:, 0] = False
            scores = scores.masked_fill(drop, float("-inf"))
    log_z = torch.logsumexp(scores, dim=-1, keepdim=True)
    cdf = (scores - log_z).exp().cumsum(dim=-1)
    target = (t.uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]).contiguous()
    choice = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[1] - 1)
    logprobs = (scores.gather(1, choice) - log_z).squeeze(1)
    tokens = choice if order is None else order.gather(1, choice)
    return tokens.squeeze(1), logprobs
