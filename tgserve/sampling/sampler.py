"""Choose each row's next token from its logits, all rows at once, and report its logprob.

Greedy rows take the argmax of the raw logits. Sampled rows go through temperature, top-k and top-p
(processors.py), then pick by inverse CDF in vocabulary order with their counter-based uniform
draw. The reported logprob is the log-softmax of the final processed scores at the chosen token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tgserve.sampling import processors
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
    scores = processors.temperature(logits, t.temperature)
    if t.any_top_k:
        scores = processors.top_k(scores, t.top_k)
    if t.any_top_p:
        scores = processors.top_p(scores, t.top_p)
    log_z = torch.logsumexp(scores, dim=-1, keepdim=True)
    cdf = (scores - log_z).exp().cumsum(dim=-1)
    total = cdf[:, -1:]
    # the target stays strictly below the total mass, so the pick is always a token with mass > 0
    target = torch.minimum(t.uniform.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    choice = torch.searchsorted(cdf, target.contiguous(), right=True)
    return choice.squeeze(1), (scores.gather(1, choice) - log_z).squeeze(1)
