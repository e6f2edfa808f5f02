"""Every TGI parameter over HTTP on the real SmolLM2 (float32), against transformers on the same
weights: logprobs, warpers and penalties as their reference computes them, seeded sampling that
does not depend on the batch, best_of, grammars and the watermark."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

from tgserve.sampling import watermark

pytestmark = pytest.mark.slow


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, model


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def generate(server, inputs: str, timeout: float = 300, **parameters) -> dict:
    r = httpx.post(server.url + "/generate", timeout=timeout, json={"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(response: dict) -> list[int]:
    return [t["id"] for t in response["details"]["tokens"]]


# ---- logprobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("words", [20, 600], ids=["one-chunk", "several-chunks"])
def test_prefill_and_top_tokens_are_transformers_log_softmax(smollm2_server, reference, words):
    """The server prefills at most 512 tokens a step: the long prompt spans two chunks."""
    tok, model = reference
    prompt = "The history of printing, told plainly: " + " ".join(["presses", "ink", "paper", "type"] * (words // 4))
    response = generate(smollm2_server, prompt, max_new_tokens=4, decoder_input_details=True, top_n_tokens=3)
    details = response["details"]
    prompt_ids = tok(prompt).input_ids
    assert (words < 100) == (len(prompt_ids) < 512)
    assert [p["id"] for p in details["prefill"]] == prompt_ids
    assert details["prefill"][0]["logprob"] is None
    assert details["prefill"][1]["text"] == tok.decode([prompt_ids[1]])
    generated = token_ids(response)
    logprobs = logits_of(model, prompt_ids + generated).log_softmax(-1)
    expected_prefill = logprobs[:len(prompt_ids) - 1].gather(1, torch.tensor(prompt_ids[1:])[:, None]).squeeze(1)
    got_prefill = torch.tensor([p["logprob"] for p in details["prefill"][1:]])
    torch.testing.assert_close(got_prefill, expected_prefill, atol=2e-3, rtol=0)
    assert len(details["top_tokens"]) == len(generated)
    for k, top in enumerate(details["top_tokens"]):
        best = logprobs[len(prompt_ids) - 1 + k].topk(3)
        assert [t["id"] for t in top] == best.indices.tolist()
        torch.testing.assert_close(torch.tensor([t["logprob"] for t in top]), best.values, atol=2e-3, rtol=0)
        assert top[0]["id"] == generated[k]  # greedy: the chosen token is the best one


def test_stream_events_carry_top_tokens(smollm2_server):
    body = {"inputs": chat("Say hello."), "parameters": {"max_new_tokens": 3, "top_n_tokens": 2}}
    with httpx.stream("POST", smollm2_server.url + "/generate_stream", json=body, timeout=120) as r:
        events = [json.loads(line[len("data:"):]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 3
    for event in events:
        assert len(event["top_tokens"]) == 2 and event["top_tokens"][0]["id"] == event["token"]["id"]


# ---- warpers and penalties against their references -----------------------------------------------

SAMPLED = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, typical_p=0.95, repetition_penalty=1.2,
               frequency_penalty=0.3, seed=42, max_new_tokens=24, details=True)
PROMPT = chat("Write a short poem about the sea and the wind.")


def reference_scores(logits: torch.Tensor, history: list[int], p: dict) -> torch.Tensor:
    """TGI's chain on one position with transformers' processors (frequency penalty written out)."""
    ids = torch.tensor([history])
    scores = RepetitionPenaltyLogitsProcessor(p["repetition_penalty"])(ids, logits[None].clone())[0]
    counts = torch.bincount(torch.tensor(history), minlength=scores.shape[0]).float()
    scores = scores - p["frequency_penalty"] * counts / len(history)
    scores = TemperatureLogitsWarper(p["temperature"])(ids, scores[None])
    scores = TopKLogitsWarper(p["top_k"])(ids, scores)
    scores = TopPLogitsWarper(p["top_p"])(ids, scores)
    return TypicalLogitsWarper(p["typical_p"])(ids, scores)[0]


def test_sampled_tokens_come_from_the_reference_processed_distribution(smollm2_server, reference):
    tok, model = reference
    response = generate(smollm2_server, PROMPT, **SAMPLED)
    prompt_ids = tok(PROMPT).input_ids
    generated = token_ids(response)
    logits = logits_of(model, prompt_ids + generated)
    for k, token in enumerate(response["details"]["tokens"]):
        history = prompt_ids + generated[:k]
        processed = reference_scores(logits[len(history) - 1], history, SAMPLED).log_softmax(-1)
        assert torch.isfinite(processed[token["id"]]), f"token {k} is outside the reference's kept set"
        assert token["logprob"] == pytest.approx(float(processed[token["id"]]), abs=2e-3)


def test_seeded_sampling_gives_the_same_tokens_alone_and_inside_a_busy_batch(smollm2_server):
    alone = token_ids(generate(smollm2_server, PROMPT, **SAMPLED))
    others = [dict(do_sample=True, temperature=0.5 + i / 16, top_p=0.95, seed=1000 + i, max_new_tokens=30,
                   repetition_penalty=1.0 + i / 32, details=True) for i in range(16)]
    questions = [chat(f"Tell me fact number {i} about the moon.") for i in range(16)]
    with ThreadPoolExecutor(17) as pool:
        target = pool.submit(generate, smollm2_server, PROMPT, **SAMPLED)
        crowd = [pool.submit(generate, smollm2_server, q, **o) for q, o in zip(questions, others)]
        busy = token_ids(target.result())
        assert all(len(token_ids(c.result())) > 0 for c in crowd)
    assert busy == alone


def test_greedy_with_repetition_penalty_equals_transformers_generate(smollm2_server, reference):
    tok, model = reference
    prompt = "List the days of the week, again and again: Monday, Tuesday,"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.5)[0, ids.shape[1]:]
    got = token_ids(generate(smollm2_server, prompt, max_new_tokens=20, repetition_penalty=1.5, details=True))
    assert got == expected.tolist()[:len(got)] and len(got) >= 1
    plain = token_ids(generate(smollm2_server, prompt, max_new_tokens=20, details=True))
    assert plain != got  # the penalty changes a repetitive continuation


def test_top_k_one_is_greedy_and_a_tiny_typical_mass_keeps_one_token(smollm2_server):
    greedy = token_ids(generate(smollm2_server, PROMPT, max_new_tokens=12, details=True))
    assert token_ids(generate(smollm2_server, PROMPT, max_new_tokens=12, details=True, top_k=1, seed=3)) == greedy
    single = generate(smollm2_server, PROMPT, max_new_tokens=12, details=True, typical_p=0.001, seed=3)
    assert all(t["logprob"] == pytest.approx(0.0, abs=1e-5) for t in single["details"]["tokens"])


# ---- best_of ---------------------------------------------------------------------------------------


def test_best_of_returns_the_best_mean_logprob_and_the_other_sequence_reproducible_by_its_seed(smollm2_server):
    params = dict(do_sample=True, temperature=1.0, max_new_tokens=16, details=True)
    response = generate(smollm2_server, PROMPT, best_of=2, **params)
    details = response["details"]
    [other] = details["best_of_sequences"]
    assert details["seed"] != other["seed"]

    def mean(d):
        return sum(t["logprob"] for t in d["tokens"]) / len(d["tokens"])

    assert mean(details) >= mean(other)
    # each sequence is what a lone request with its seed gives: sharing the prompt's blocks changed
    # nothing. Up to float rounding: two rows in a batch do not round exactly as one row alone (oneDNN
    # splits the 1536 -> 576 down projection differently at one row: ~1e-5 in a logprob), which moves
    # the inverse-CDF boundaries by about that much; a draw that lands among far-tail tokens (each
    # thinner than that) can then take a neighbour (2 of 40 16-token sequences at temperature 1).
    for d in (details, other):
        alone = generate(smollm2_server, PROMPT, seed=d["seed"], **params)["details"]["tokens"]
        shared = d["tokens"]
        k = next((i for i, (a, b) in enumerate(zip(alone, shared)) if a["id"] != b["id"]), len(shared))
        assert all(abs(a["logprob"] - b["logprob"]) < 1e-3 for a, b in zip(alone[:k], shared[:k]))
        if k < len(shared):  # parted at a draw in the far tail, not at a real difference
            assert alone[k]["logprob"] < -6.9 and shared[k]["logprob"] < -6.9, (k, alone[k], shared[k])
    assert other["generated_text"] != response["generated_text"] or other["seed"] != details["seed"]


# ---- grammars ---------------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"type": "string", "maxLength": 24}},
          "required": ["name", "age", "city"]}
IPV4 = r"(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}"
GRAMMAR_REQUESTS = [
    (chat("Describe a person as JSON with a name, an age and a city."), {"type": "json", "value": PERSON}, {}),
    (chat("Describe a person as JSON."), {"type": "json", "value": json.dumps(PERSON)},
     {"do_sample": True, "seed": 5, "temperature": 1.2}),
    (chat("What is the IP address of a home router?"), {"type": "regex", "value": IPV4}, {}),
    (chat("Give me any IP address."), {"type": "regex", "value": IPV4}, {"do_sample": True, "seed": 9}),
]


def check_grammar_output(grammar: dict, text: str) -> None:
    if grammar["type"] == "regex":
        assert re.fullmatch(grammar["value"], text), text
    else:
        jsonschema.validate(json.loads(text), PERSON)


def test_grammar_outputs_always_parse_alone_and_inside_a_busy_batch(smollm2_server):
    for prompt, grammar, extra in GRAMMAR_REQUESTS:
        response = generate(smollm2_server, prompt, max_new_tokens=80, grammar=grammar, details=True, **extra)
        assert response["details"]["finish_reason"] == "eos_token"
        check_grammar_output(grammar, response["generated_text"])
    crowd = [dict(do_sample=True, seed=i, max_new_tokens=40, temperature=0.9) for i in range(12)]
    with ThreadPoolExecutor(16) as pool:
        busy = [pool.submit(generate, smollm2_server, p, max_new_tokens=80, grammar=g, **e)
                for p, g, e in GRAMMAR_REQUESTS]
        unconstrained = [pool.submit(generate, smollm2_server, PROMPT, **c) for c in crowd]
        for (_, grammar, _), future in zip(GRAMMAR_REQUESTS, busy):
            check_grammar_output(grammar, future.result()["generated_text"])
        assert all(f.result()["generated_text"] for f in unconstrained)


# ---- watermark ----------------------------------------------------------------------------------------


def test_watermark_z_score_separates_watermarked_from_plain_output(smollm2_server, reference):
    tok, _ = reference
    questions = ["Tell me a story about a dragon.", "Describe your favourite city.", "Explain how rain forms.",
                 "Write a letter to a friend about a holiday."]

    def z(marked: bool) -> float:
        """One z-score over all four answers (each one's first token follows its prompt's last)."""
        green = total = 0
        for i, q in enumerate(questions):
            prompt = chat(q)
            r = generate(smollm2_server, prompt, max_new_tokens=64, do_sample=True, seed=100 + i, watermark=marked,
                         details=True, ignore_eos_token=True)
            ids = token_ids(r)
            green += watermark.green_count(ids, tok(prompt).input_ids[-1])
            total += len(ids)
        return watermark.z_score_of(green, total)

    marked, plain = z(True), z(False)
    print(f"watermark z-score over 256 tokens: watermarked {marked:.2f}, plain {plain:.2f}")
    assert marked > 4.0, marked
    assert abs(plain) < 3.0, plain
