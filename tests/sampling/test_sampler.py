"""The sampler against transformers' own warpers, and the counter-based randomness it draws on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tgserve.params import SamplingParams
from tgserve.sampling.sampler import sample
from tgserve.sampling.tensors import SamplingTensors, uniform_from

CPU = torch.device("cpu")


def random_logits(rows: int, vocab: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def warped(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' temperature → top-k → top-p chain, as TGI applies it."""
    scores = TemperatureLogitsWarper(p.temperature)(None, logits.clone())
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return scores


def run(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]):
    return sample(logits, SamplingTensors.build(params, positions, CPU))


def sampled(temperature=1.0, top_k=0, top_p=1.0, seed=0) -> SamplingParams:
    return SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


FILTERED = [
    sampled(temperature=1.3, top_k=10),
    sampled(top_p=0.8),
    sampled(temperature=0.5, top_k=20, top_p=0.9),
    sampled(temperature=2.0, top_k=5, top_p=0.5),
    sampled(temperature=0.7, top_k=1),
]


# ---- greedy ---------------------------------------------------------------------------------------


def test_greedy_rows_return_argmax_and_its_log_softmax():
    logits = random_logits(6, 500)
    # temperature / top-k / top-p are ignored without do_sample
    params = [SamplingParams(), SamplingParams(temperature=0.3, top_k=3, top_p=0.5)] * 3
    out = run(logits, params, [5] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-5, rtol=0)


def test_all_greedy_steps_reuse_columns_equal_to_the_general_build():
    plain = [SamplingParams()] * 3
    fast = SamplingTensors.build(plain, [4, 9, 2], CPU)
    assert SamplingTensors.build(plain, [7, 1, 3], CPU) is fast  # built once per row count
    general = SamplingTensors.build([*plain, sampled()], [4, 9, 2, 5], CPU)  # the general path
    for name in ("temperature", "top_k", "top_p", "typical_p", "uniform", "top_n"):
        assert torch.equal(getattr(fast, name), getattr(general, name)[:3]), name
    assert fast.greedy_rows.tolist() == general.greedy_rows.tolist() == [0, 1, 2]
    assert fast.candidate_rows == () and fast.vocab_rows is None and fast.top_n_rows is None
    assert fast.penalty_rows is None and fast.bias is None and fast.watermark_rows is None
    # any feature on any row takes the general path
    for other in (SamplingParams(top_n_tokens=2), SamplingParams(repetition_penalty=1.2),
                  SamplingParams(watermark=True), SamplingParams(logit_bias=((5, 1.0),))):
        built = SamplingTensors.build([*plain[:2], other], [4, 9, 2], CPU, [1, 2, 3])
        assert built is not fast and built.greedy_rows.tolist() == [0, 1, 2]


def test_mixed_batch_keeps_greedy_rows_exactly_greedy():
    logits = random_logits(8, 300, seed=1)
    params = [SamplingParams(), *FILTERED[:3], SamplingParams(), sampled(), FILTERED[3], SamplingParams()]
    out = run(logits, params, list(range(8)))
    greedy = [i for i, p in enumerate(params) if not p.do_sample]
    log_softmax = logits.log_softmax(-1)
    for i in greedy:
        assert out.token_ids[i] == int(logits[i].argmax())
        assert out.logprobs[i] == pytest.approx(float(log_softmax[i, out.token_ids[i]]), abs=1e-5)
    # the sampled rows are not all greedy (or the batch would prove nothing)
    assert any(out.token_ids[i] != int(logits[i].argmax()) for i in range(8) if i not in greedy)


# ---- sampled rows against transformers ------------------------------------------------------------


@pytest.mark.parametrize("params", FILTERED, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_sampled_tokens_are_exactly_the_set_transformers_warpers_keep(params):
    """Every draw lands in the kept set, and over 20k draws every kept token turns up."""
    row = random_logits(1, 200, seed=2)
    kept = set(torch.nonzero(torch.isfinite(warped(row, params)[0])).flatten().tolist())
    assert warped(row, params).softmax(-1)[0, sorted(kept)].min() > 1e-3  # each is drawn ~20+ times
    n = 20_000
    out = run(row.expand(n, -1).contiguous(), [params] * n, list(range(n)))
    assert set(out.token_ids) == kept


def test_top_k_keeps_tokens_tied_with_the_kth_score_like_transformers():
    row = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    params = sampled(top_k=2)
    kept = set(torch.nonzero(torch.isfinite(warped(row, params)[0])).flatten().tolist())
    assert kept == {0, 1, 2}
    n = 5_000
    out = run(row.expand(n, -1).contiguous(), [params] * n, list(range(n)))
    assert set(out.token_ids) == kept


@pytest.mark.parametrize("vocab", [50, 1000])
def test_sampled_logprob_is_log_softmax_of_transformers_processed_scores(vocab):
    params = [*FILTERED, sampled(temperature=0.8), sampled(temperature=1.0)]
    rows = len(params)
    logits = random_logits(rows, vocab, seed=3)
    for position in range(20):
        out = run(logits, params, [position] * rows)
        for i, p in enumerate(params):
            expected = warped(logits[i:i + 1], p).log_softmax(-1)[0, out.token_ids[i]]
            assert torch.isfinite(expected)
            assert out.logprobs[i] == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("params", [
    sampled(temperature=0.8), sampled(temperature=1.5), sampled(top_k=3), sampled(top_p=0.7),
    sampled(temperature=0.6, top_k=3, top_p=0.9),
], ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_empirical_distribution_matches_the_processed_softmax(params):
    """Checks the inverse-CDF pick: 20k draws over 4 tokens against softmax of the warped scores."""
    row = torch.tensor([[1.0, 0.2, -0.5, 1.6]])
    n = 20_000
    out = run(row.expand(n, -1).contiguous(), [params] * n, list(range(n)))
    freq = np.bincount(out.token_ids, minlength=4) / n
    expected = warped(row, params).softmax(-1)[0].numpy()
    np.testing.assert_allclose(freq, expected, atol=0.02)


# ---- seeded determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [sampled(seed=42), sampled(temperature=0.9, top_k=40, top_p=0.95, seed=42)],
                         ids=["plain", "filtered"])
def test_same_seed_and_position_give_the_same_token_whatever_the_batch(target):
    """Companions use the same features as the target (mixed features are checked below)."""
    vocab = 400
    row = random_logits(1, vocab, scale=1.0, seed=4)
    others = random_logits(5, vocab, seed=5)
    plain = target.top_k == 0
    companions = [sampled(temperature=1.2, seed=s) if plain else sampled(top_k=7, top_p=0.5, seed=s)
                  for s in (1, 2, 3)] + [SamplingParams(), SamplingParams()]
    for position in (0, 17, 300):
        alone = run(row, [target], [position])
        for layout in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4], [3, 0]):
            params = [target if k == 0 else companions[k - 1] for k in layout]
            logits = torch.cat([row if k == 0 else others[k - 1:k] for k in layout])
            positions = [position if k == 0 else 1000 + k for k in layout]
            out = run(logits, params, positions)
            i = layout.index(0)
            assert out.token_ids[i] == alone.token_ids[0]
            assert out.logprobs[i] == pytest.approx(alone.logprobs[0], abs=1e-6)


def test_plain_row_gives_the_same_token_whether_or_not_another_row_uses_top_k():
    row = random_logits(1, 100, scale=3.0, seed=0)
    target = sampled(seed=7)
    for position in range(50):
        alone = run(row, [target], [position]).token_ids[0]
        beside = run(row.repeat(2, 1), [target, sampled(top_k=5, seed=8)], [position, position]).token_ids[0]
        assert alone == beside


def test_different_seeds_and_positions_give_different_tokens():
    row = random_logits(1, 1000, scale=0.5, seed=6)  # flat: about every draw is a new token
    by_position = run(row.expand(64, -1), [sampled(seed=9)] * 64, list(range(64))).token_ids
    by_seed = run(row.expand(64, -1), [sampled(seed=s) for s in range(64)], [10] * 64).token_ids
    assert len(set(by_position)) > 40
    assert len(set(by_seed)) > 40


def test_draw_near_one_still_picks_a_kept_token():
    seed, position = 57217548, 12  # uniform_from gives 0.99999997623..., which float32 rounds to 1.0
    assert uniform_from(np.array([seed], np.uint64), np.array([position], np.uint64))[0] < 1.0
    row = random_logits(1, 50, scale=1.0, seed=0)
    out = run(row, [sampled(top_k=5, seed=seed)], [position])
    assert out.token_ids[0] in row.topk(5).indices[0].tolist()
    assert np.isfinite(out.logprobs[0])


# ---- uniform_from ---------------------------------------------------------------------------------


def test_uniform_from_is_in_zero_one_and_roughly_uniform():
    positions = np.arange(200_000, dtype=np.uint64)
    u = uniform_from(np.full_like(positions, 123), positions)
    assert u.dtype == np.float64
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=10, range=(0.0, 1.0))[0]
    np.testing.assert_allclose(counts / len(u), 0.1, atol=0.005)


def test_uniform_from_is_deterministic_and_elementwise():
    seeds = np.array([0, 1, 2**63, 2**64 - 1, 5], dtype=np.uint64)
    positions = np.array([0, 7, 7, 3, 1 << 40], dtype=np.uint64)
    u = uniform_from(seeds, positions)
    np.testing.assert_array_equal(u, uniform_from(seeds.copy(), positions.copy()))
    for i in range(len(seeds)):
        assert uniform_from(seeds[i:i + 1], positions[i:i + 1])[0] == u[i]


def test_uniform_from_differs_across_positions_and_seeds():
    n = 10_000
    positions = np.arange(n, dtype=np.uint64)
    assert len(np.unique(uniform_from(np.full(n, 99, np.uint64), positions))) == n
    assert len(np.unique(uniform_from(np.arange(n, dtype=np.uint64), np.full(n, 5, np.uint64)))) == n
    # (seed, position) is not a symmetric or additive pair
    assert uniform_from(np.array([1], np.uint64), np.array([2], np.uint64))[0] != \
        uniform_from(np.array([2], np.uint64), np.array([1], np.uint64))[0]
