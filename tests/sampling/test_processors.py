"""Every processor against its reference on the same logits, in one batch mixing settings per row.

References: transformers' RepetitionPenaltyLogitsProcessor, TypicalLogitsWarper, TopK/TopP and
Temperature warpers (TGI follows them); frequency penalty and the watermark computed directly.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

from tgserve.params import SamplingParams
from tgserve.sampling import processors, watermark
from tgserve.sampling.history import TokenCounts
from tgserve.sampling.sampler import GrammarMask, sample
from tgserve.sampling.tensors import SamplingTensors

CPU = torch.device("cpu")
VOCAB = 300


def random_logits(rows: int, vocab: int = VOCAB, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def histories(rows: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (5 + 7 * i,), generator=g).tolist() for i in range(rows)]


def counts_of(history: list[list[int]]) -> torch.Tensor:
    counts = torch.zeros(len(history), VOCAB)
    for i, h in enumerate(history):
        counts[i].index_add_(0, torch.tensor(h), torch.ones(len(h)))
    return counts


def seen_of(history: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flat (row, token, count) form the penalties take."""
    counts = counts_of(history)
    rows, tokens = counts.nonzero(as_tuple=True)
    return rows, tokens, counts[rows, tokens]


def reference_frequency(scores: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """TGI's frequency penalty written out: logit -= penalty * count(token) / tokens so far."""
    out = scores.clone()
    for token in set(history):
        out[token] -= penalty * history.count(token) / len(history)
    return out


def reference(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """One row through TGI's order with transformers' processors (warpers only when sampling)."""
    scores = logits[None].clone()
    ids = torch.tensor([history])
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.frequency_penalty != 0.0:
        scores = reference_frequency(scores[0], history, p.frequency_penalty)[None]
    if p.do_sample:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
        if p.top_k:
            scores = TopKLogitsWarper(p.top_k)(ids, scores)
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(ids, scores)
        if p.typical_p < 1.0:
            scores = TypicalLogitsWarper(p.typical_p)(ids, scores)
    return scores[0]


MIXED = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(do_sample=True, temperature=0.7, typical_p=0.6, seed=1),
    SamplingParams(frequency_penalty=1.5),
    SamplingParams(do_sample=True, top_k=40, top_p=0.8, repetition_penalty=0.8, seed=2),
    SamplingParams(do_sample=True, typical_p=0.3, frequency_penalty=-1.0, seed=3),
    SamplingParams(do_sample=True, temperature=1.4, top_p=0.95, typical_p=0.9, repetition_penalty=2.0,
                   frequency_penalty=0.7, seed=4),
    SamplingParams(do_sample=True, seed=5),
]


def run_mixed(logits, params, history, top_n: int = 0):
    params = [p if not top_n else SamplingParams(**{**{f: getattr(p, f) for f in p.__struct_fields__},
                                                    "top_n_tokens": top_n}) for p in params]
    t = SamplingTensors.build(params, [len(h) for h in history], CPU, [h[-1] for h in history])
    seen = seen_of([history[i] for i in t.penalty_rows.tolist()]) if t.penalty_rows is not None else None
    return sample(logits.clone(), t, seen)


def test_each_row_of_a_mixed_batch_matches_its_reference_processing():
    """The chosen logprob is the reference's log-softmax at the chosen token, the token is one the
    reference keeps (the argmax for greedy rows), for every row of one batch."""
    logits = random_logits(len(MIXED))
    history = histories(len(MIXED))
    for position_shift in range(5):  # several draws for the sampled rows
        hist = [h + [position_shift] * position_shift for h in history]
        out = run_mixed(logits, MIXED, hist)
        for i, p in enumerate(MIXED):
            ref = reference(logits[i], p, hist[i])
            token = out.token_ids[i]
            assert torch.isfinite(ref[token]), f"row {i} chose a token the reference removes"
            if not p.do_sample:
                assert token == int(ref.argmax())
            assert out.logprobs[i] == pytest.approx(float(ref.log_softmax(-1)[token]), abs=1e-4)


def test_top_tokens_are_the_reference_processed_distribution_best():
    logits = random_logits(len(MIXED), seed=3)
    history = histories(len(MIXED), seed=4)
    out = run_mixed(logits, MIXED, history, top_n=4)
    for i, p in enumerate(MIXED):
        ref = reference(logits[i], p, history[i]).log_softmax(-1)
        best = ref.topk(4)
        kept = torch.isfinite(best.values)  # a warper may leave fewer than 4 tokens
        assert out.top_ids[i] == best.indices[kept].tolist()
        torch.testing.assert_close(torch.tensor(out.top_logprobs[i]), best.values[kept], atol=1e-4, rtol=0)


def test_rows_without_a_processor_are_untouched_by_it():
    logits = random_logits(3, seed=5)
    history = histories(3)
    plain = [SamplingParams(), SamplingParams(do_sample=True, seed=9), SamplingParams(top_n_tokens=2)]
    alone = run_mixed(logits, plain, history)
    crowded = run_mixed(torch.cat([logits, random_logits(len(MIXED), seed=6)]), plain + MIXED,
                        history + histories(len(MIXED), seed=7))
    assert crowded.token_ids[:3] == alone.token_ids
    assert crowded.logprobs[:3] == pytest.approx(alone.logprobs, abs=1e-6)
    assert crowded.top_ids[2] == alone.top_ids[2]


def test_top_tokens_include_ties_with_the_nth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    t = SamplingTensors.build([SamplingParams(top_n_tokens=2)], [1], CPU, [0])
    out = sample(logits, t)
    assert out.top_ids[0] == [0, 2, 3] or out.top_ids[0] == [0, 3, 2]


def test_top_tokens_never_list_tokens_with_no_mass():
    logits = random_logits(1, seed=8)
    params = [SamplingParams(do_sample=True, top_k=2, top_n_tokens=5, seed=1)]
    out = sample(logits, SamplingTensors.build(params, [3], CPU, [0]))
    assert len(out.top_ids[0]) == 2


# ---- the candidate shortcut of top-p / typical-p against a full sort --------------------------


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0], ids=["flat", "normal", "peaked"])
def test_top_p_and_typical_p_agree_with_transformers_whether_or_not_the_cut_is_in_the_candidates(scale):
    vocab = 2000  # > CANDIDATES: a flat distribution forces the full-sort fallback
    logits = random_logits(4, vocab, scale=scale, seed=11)
    masses = torch.tensor([0.2, 0.5, 0.9, 0.99])
    ours_p = processors.top_p(logits, masses)
    ours_typ = processors.typical_p(logits, masses)
    for i, m in enumerate(masses.tolist()):
        ref_p = TopPLogitsWarper(m)(None, logits[i:i + 1].clone())[0]
        ref_typ = TypicalLogitsWarper(m)(None, logits[i:i + 1].clone())[0]
        assert torch.equal(torch.isfinite(ours_p[i]), torch.isfinite(ref_p)), f"top_p row {i}"
        assert torch.equal(torch.isfinite(ours_typ[i]), torch.isfinite(ref_typ)), f"typical_p row {i}"


def test_penalties_match_transformers_and_the_direct_frequency_formula():
    logits = random_logits(4, seed=12)
    history = histories(4, seed=13)
    rep = torch.tensor([1.0, 1.5, 0.7, 1.2])
    freq = torch.tensor([0.0, 0.0, 1.0, -0.5])
    lengths = torch.tensor([float(len(h)) for h in history])
    ours = processors.penalties(logits.clone(), seen_of(history), rep, freq, lengths)
    for i in range(4):
        ref = logits[i:i + 1].clone()
        if rep[i] != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(float(rep[i]))(torch.tensor([history[i]]), ref)
        ref = reference_frequency(ref[0], history[i], float(freq[i]))
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[0], logits[0])  # identity settings are exact


# ---- grammar mask stage --------------------------------------------------------------------------


def test_grammar_mask_applies_before_the_warpers_and_only_to_its_rows():
    logits = random_logits(3, seed=14)
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[[5, 17, 250]] = True
    mask = GrammarMask(torch.tensor([1, 2]), lambda s: s.masked_fill(~allowed, float("-inf")))
    params = [SamplingParams(), SamplingParams(), SamplingParams(do_sample=True, top_k=50, seed=3)]
    out = sample(logits.clone(), SamplingTensors.build(params, [4] * 3, CPU, [0] * 3), grammar=mask)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] == max([5, 17, 250], key=lambda t: float(logits[1, t]))
    assert out.token_ids[2] in (5, 17, 250)
    constrained = logits[1].masked_fill(~allowed, float("-inf")).log_softmax(-1)
    assert out.logprobs[1] == pytest.approx(float(constrained[out.token_ids[1]]), abs=1e-5)


# ---- watermark -----------------------------------------------------------------------------------


def test_watermark_adds_delta_to_the_green_list_of_the_previous_token_only_on_its_rows():
    logits = random_logits(3, seed=15)
    params = [SamplingParams(watermark=True), SamplingParams(), SamplingParams(watermark=True)]
    previous = [7, 7, 123]
    t = SamplingTensors.build(params, [5] * 3, CPU, previous)
    biased = processors_after_watermark(logits, t, gamma=0.25, delta=3.0)
    vocab = torch.arange(VOCAB)
    for row in (0, 2):
        green = watermark.green(torch.tensor(previous[row]), vocab, 0.25)
        torch.testing.assert_close(biased[row], logits[row] + 3.0 * green.float())
        assert 0.15 < green.float().mean() < 0.35
    torch.testing.assert_close(biased[1], logits[1])
    # a different previous token gives a different split
    assert not torch.equal(watermark.green(torch.tensor(7), vocab, 0.25), watermark.green(torch.tensor(123), vocab, 0.25))


def processors_after_watermark(logits, t, gamma, delta) -> torch.Tensor:
    """Greedy rows' chosen logprob reveals the biased scores: check via the sampler's own stage."""
    from tgserve.sampling.sampler import _on_rows

    return _on_rows(logits.clone(), t.watermark_rows, lambda s: watermark.bias(s, t.previous_tokens, gamma, delta))


def test_z_score_is_high_for_all_green_text_and_near_zero_for_random_text():
    g = torch.Generator().manual_seed(0)
    vocab = torch.arange(5000)
    tokens, previous = [], 1
    for _ in range(100):  # each next token drawn from the green list of the one before
        green = vocab[watermark.green(torch.tensor(previous), vocab, 0.5)]
        previous = int(green[torch.randint(len(green), (1,), generator=g)])
        tokens.append(previous)
    assert watermark.z_score(tokens, 1, 0.5) == pytest.approx(10.0)  # (100 - 50) / 5
    random_tokens = torch.randint(5000, (400,), generator=g).tolist()
    assert abs(watermark.z_score(random_tokens, 1, 0.5)) < 4


# ---- token counts kept across steps ---------------------------------------------------------------


def test_token_counts_follow_histories_and_reuse_rows():
    counts = TokenCounts(VOCAB, CPU, capacity=2, width=4)  # both grow past their first size

    def check(rows, history):
        torch.testing.assert_close(counts.table[rows], counts_of(history))
        which, tokens, n = counts.seen(rows)
        got = sorted(zip(which.tolist(), tokens.tolist(), n.tolist()))
        want = sorted(zip(*(x.tolist() for x in seen_of(history))))
        assert got == want

    history = histories(3, seed=16)
    rows = counts.rows(["a", "b", "c"], history)
    check(rows, history)
    new_token = next(t for t in range(VOCAB) if t not in history[0] and t not in history[1])
    counts.add(rows[:2], torch.tensor([4, new_token]))
    history[0].append(4)
    history[1].append(new_token)
    again = counts.rows(["a", "b", "c"], history)
    assert torch.equal(again, rows)
    check(again, history)
    counts.release(["b"])
    fresh = counts.rows(["d"], [[1, 1, 2]])
    assert fresh.tolist() == [int(rows[1])]  # b's row, refilled for d
    check(fresh, [[1, 1, 2]])

def test_top_k_ties_past_the_candidate_width_are_all_kept_like_transformers():
    """300 tokens tied at the k-th score: the row leaves the 256-candidate path and keeps them all."""
    row = torch.full((1, 400), -5.0)
    row[0, 50:350] = 1.0
    params = SamplingParams(do_sample=True, top_k=5, seed=1)
    kept = torch.isfinite(TopKLogitsWarper(5)(None, row.clone())[0])
    assert int(kept.sum()) == 300
    n = 4000
    out = sample(row.expand(n, -1).contiguous(),
                 SamplingTensors.build([params] * n, list(range(n)), CPU, [0] * n))
    drawn = set(out.token_ids)
    assert drawn <= set(range(50, 350)) and len(drawn) > 256


def test_small_top_k_rows_and_whole_vocabulary_rows_agree_with_the_reference_side_by_side():
    logits = random_logits(4, vocab=2000, seed=21)
    params = [SamplingParams(do_sample=True, top_k=30, top_p=0.8, seed=1, top_n_tokens=3),
              SamplingParams(do_sample=True, top_k=1000, top_p=0.8, seed=1, top_n_tokens=3),
              SamplingParams(do_sample=True, top_p=0.8, seed=1, top_n_tokens=3),
              SamplingParams(do_sample=True, top_k=256, typical_p=0.7, seed=2, top_n_tokens=3)]
    t = SamplingTensors.build(params, [7] * 4, CPU, [0] * 4)
    assert [(w, r.tolist()) for w, r in t.candidate_rows] == [(64, [0]), (256, [3])]
    assert t.vocab_rows.tolist() == [1, 2]
    out = sample(logits.clone(), t)
    for i, p in enumerate(params):
        ref = TopKLogitsWarper(p.top_k)(None, logits[i:i + 1].clone()) if p.top_k else logits[i:i + 1].clone()
        if p.top_p < 1:
            ref = TopPLogitsWarper(p.top_p)(None, ref)
        if p.typical_p < 1:
            ref = TypicalLogitsWarper(p.typical_p)(None, ref)
        ref = ref[0].log_softmax(-1)
        assert out.logprobs[i] == pytest.approx(float(ref[out.token_ids[i]]), abs=1e-4)
        best = ref.topk(3)
        assert out.top_ids[i] == best.indices[torch.isfinite(best.values)].tolist()


def test_a_grammar_leaving_fewer_tokens_than_top_k_samples_only_allowed_tokens():
    logits = random_logits(1, vocab=2000, seed=22)
    allowed = torch.zeros(2000, dtype=torch.bool)
    allowed[[3, 1500]] = True
    mask = GrammarMask(torch.tensor([0]), lambda s: s.masked_fill(~allowed, float("-inf")))
    params = [SamplingParams(do_sample=True, top_k=50, seed=s) for s in range(200)]
    out = sample(logits.expand(200, -1).clone(), SamplingTensors.build(params, [5] * 200, CPU, [0] * 200),
                 grammar=GrammarMask(torch.arange(200), mask.apply))
    assert set(out.token_ids) == {3, 1500}


# ---- OpenAI's penalties and logit bias (through the stateful Sampler) -----------------------------


class FakeSeq:
    def __init__(self, request_id, prompt, generated, sampling):
        self.request_id, self.sampling = request_id, sampling
        self.token_ids, self.num_prompt_tokens = list(prompt) + list(generated), len(prompt)


def test_openai_penalties_count_generated_tokens_only_and_logit_bias_adds():
    from tgserve.sampling.sampler import Sampler

    logits = random_logits(3, seed=30)
    prompt, generated = [5, 6, 7, 7], [7, 9, 9, 9]
    seqs = [FakeSeq("a", prompt, generated, SamplingParams(output_frequency_penalty=0.5, output_presence_penalty=0.25,
                                                            top_n_tokens=VOCAB)),
            FakeSeq("b", prompt, generated, SamplingParams(top_n_tokens=VOCAB)),
            FakeSeq("c", prompt, generated, SamplingParams(logit_bias=((11, 100.0), (12, -100.0), (10**6, 5.0)),
                                                            top_n_tokens=VOCAB))]
    sampler = Sampler(VOCAB, CPU)
    out = sampler.sample(logits.clone(), sampler.prepare(seqs))
    expected_a = logits[0].clone()
    expected_a[7] -= 0.5 * 1 + 0.25  # once in the generated tokens (the prompt's two do not count)
    expected_a[9] -= 0.5 * 3 + 0.25
    expected_c = logits[2].clone()
    expected_c[11] += 100.0
    expected_c[12] -= 100.0
    for row, expected in ((0, expected_a), (1, logits[1]), (2, expected_c)):
        got = torch.full((VOCAB,), float("-inf"))
        got[out.top_ids[row]] = torch.tensor(out.top_logprobs[row])
        torch.testing.assert_close(got, expected.log_softmax(-1), atol=1e-4, rtol=0)
    assert out.token_ids[2] == 11
    # the chosen token counts for the next step
    seqs[0].token_ids.append(out.token_ids[0])
    again = sampler.sample(logits.clone(), sampler.prepare(seqs))
    counts_before = {7: 1, 9: 3}
    counts_before[out.token_ids[0]] = counts_before.get(out.token_ids[0], 0) + 1
    expected = logits[0].clone()
    for token, n in counts_before.items():
        expected[token] -= 0.5 * n + 0.25
    got = torch.full((VOCAB,), float("-inf"))
    got[again.top_ids[0]] = torch.tensor(again.top_logprobs[0])
    torch.testing.assert_close(got, expected.log_softmax(-1), atol=1e-4, rtol=0)
