"""The judge: on the real SmolLM2 in float32, the server's greedy tokens equal transformers' generate,
one request at a time and in one concurrent burst of prompts of different lengths."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, as if to a child who keeps asking questions about it.",
    "List three prime numbers.",
    "Hi",
    "Translate 'good morning' into Spanish and German.",
    "What is 12 times 12? Answer with the number and a short explanation of how you computed it step by step.",
    "Name a famous painting.",
    "Give me a short recipe for pancakes with the quantities of flour, milk and eggs you would use.",
]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts_and_expected(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    prompts.append("The history of the printing press begins")  # a raw completion prompt too
    expected = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    return prompts, expected


def generated_ids(server, prompt: str) -> list[int]:
    r = httpx.post(server.url + "/generate", timeout=300, json={
        "inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True}})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_greedy_equals_transformers_one_at_a_time(smollm2_server, prompts_and_expected):
    prompts, expected = prompts_and_expected
    assert [generated_ids(smollm2_server, p) for p in prompts] == expected


def test_greedy_equals_transformers_in_a_concurrent_burst(smollm2_server, prompts_and_expected):
    prompts, expected = prompts_and_expected
    assert len(prompts) >= 8 and len({len(p) for p in prompts}) == len(prompts)
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda p: generated_ids(smollm2_server, p), prompts)) == expected


def test_the_answer_is_sensible(smollm2_server):
    r = httpx.post(smollm2_server.url + "/generate", timeout=120, json={
        "inputs": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "parameters": {"max_new_tokens": 12}})
    assert "Paris" in r.json()["generated_text"]
