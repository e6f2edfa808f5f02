"""The native greedy choice (layers/kernels/greedy.c) equals PyTorch's argmax and logsumexp."""

from __future__ import annotations

import pytest
import torch

from tgserve.layers import cpu_kernels


def reference(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = scores.argmax(dim=-1)
    return tokens, scores.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (64, 49152), (3, 17), (5, 1000)])
def test_greedy_kernel_matches_argmax_and_logsumexp(rows, vocab):
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 4
    scores[0, :: max(1, vocab // 7)] = float("-inf")  # masked tokens (a grammar, logit_bias)
    native = cpu_kernels.greedy(scores)
    if native is None:
        pytest.skip("no native kernels here")
    tokens, logprobs = reference(scores)
    assert native[0].tolist() == tokens.tolist()
    torch.testing.assert_close(native[1], logprobs, atol=1e-5, rtol=1e-5)


def test_ties_take_the_first_maximal_column_and_a_lone_token_has_logprob_zero():
    scores = torch.full((2, 300), float("-inf"))
    scores[0, [40, 7, 250]] = 3.0  # three-way tie: column 7 first
    scores[1, 123] = -2.0  # every other token masked
    native = cpu_kernels.greedy(scores)
    if native is None:
        pytest.skip("no native kernels here")
    assert native[0].tolist() == [7, 123]
    torch.testing.assert_close(native[1], torch.tensor([-torch.log(torch.tensor(3.0)).item(), 0.0]))


def test_only_float32_contiguous_cpu_rows_are_taken():
    assert cpu_kernels.greedy(torch.randn(2, 8, dtype=torch.bfloat16)) is None
    assert cpu_kernels.greedy(torch.randn(8, 2).t()) is None
