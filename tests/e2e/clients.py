"""What the real-client suites share: each client runs from its own virtualenv (installed by `make`
as a user would), as one script whose calls run concurrently and come back as one JSON line; the
expected content comes from transformers' own greedy generate on the same weights, in float32."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass

import pytest
import torch

# Prepended to every client script: `run(jobs)` runs each named call in a thread pool (the server
# batches them, which keeps the suite short) and prints {name: {"ok": result} | {"error": ...}}.
JOB_RUNNER = r'''
import json, sys, time, traceback
from concurrent.futures import ThreadPoolExecutor

def run(jobs, workers=8):
    def one(item):
        name, job = item
        start = time.monotonic()
        try:
            out = {"ok": job()}
        except Exception as e:
            out = {"error": {"type": type(e).__name__, "status": getattr(e, "status_code", None),
                             "message": str(e)[:2000], "traceback": traceback.format_exc()[-3000:]}}
        out["seconds"] = round(time.monotonic() - start, 2)
        return name, out
    with ThreadPoolExecutor(workers) as pool:
        results = dict(pool.map(one, jobs.items()))
    print(json.dumps(results))
'''


def client_python(variable: str, default: str) -> str:
    """The client venv's python, as `make test` exports it."""
    path = os.environ.get(variable, default)
    if not os.path.exists(path):
        pytest.fail(f"the client venv is missing ({path}); `make test` creates it and sets {variable}")
    return path


def run_client(python: str, script: str, url: str, args: list[str] = (), timeout: float = 600) -> dict:
    """Runs `script` (after JOB_RUNNER) as `python -c SCRIPT url *args`; returns its JSON line."""
    result = subprocess.run([python, "-c", JOB_RUNNER + script, url, *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def ok(results: dict, name: str):
    """One call's result; the client's exception (with its traceback) fails the test that reads it."""
    out = results[name]
    if "error" in out:
        error = out["error"]
        pytest.fail(f"{name}: {error['type']} (status {error['status']}): {error['message']}\n{error['traceback']}")
    return out["ok"]


def error(results: dict, name: str) -> dict:
    """The exception a call was expected to raise."""
    out = results[name]
    assert "error" in out, f"{name} should have failed, returned {out['ok']!r}"
    return out["error"]


@dataclass(frozen=True)
class Greedy:
    prompt_ids: list[int]
    ids: list[int]  # generated, the closing EOS included (as generate returns it)
    text: str  # generated text, special tokens skipped
    finish_reason: str  # OpenAI's: "stop" at EOS, else "length"
    eos: bool


class Reference:
    """transformers on the served weights: the chat template, greedy generate, log-softmax."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def greedy(self, prompt: str, max_new_tokens: int, add_special_tokens: bool) -> Greedy:
        prompt_ids = self.tok(prompt, add_special_tokens=add_special_tokens).input_ids
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                      dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False)
        ids = out[0, len(prompt_ids):].tolist()
        eos = bool(ids) and ids[-1] in self.eos_ids
        return Greedy(prompt_ids, ids, self.tok.decode(ids, skip_special_tokens=True),
                      "stop" if eos else "length", eos)

    def greedy_chat(self, messages: list[dict], max_new_tokens: int) -> Greedy:
        return self.greedy(self.chat_prompt(messages), max_new_tokens, add_special_tokens=False)

    def log_softmax(self, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab]: row i is the distribution token ids[i] was chosen from."""
        with torch.inference_mode():
            logits = self.model(torch.tensor([prompt_ids + ids])).logits[0].float()
        return torch.log_softmax(logits[len(prompt_ids) - 1:len(prompt_ids) + len(ids) - 1], dim=-1)

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id])


@functools.cache
def reference(model_dir: str) -> Reference:
    """One load per test process, shared by every client's module."""
    return Reference(model_dir)


def check_top_logprobs(ref: Reference, row: torch.Tensor, entries: list[dict], k: int, tol: float) -> None:
    """`entries` ({"token", "logprob"}) are the k most likely tokens of `row`, best first: their
    values match the reference's top k, and so do their texts wherever no near-tie could swap them."""
    assert len(entries) == k
    values, top_ids = row.topk(k + 1)  # one more, to see whether the k-th could be swapped out
    got = [e["logprob"] for e in entries]
    assert got == sorted(got, reverse=True)
    assert torch.allclose(torch.tensor(got), values[:k], atol=tol), (got, values[:k].tolist())
    for j, entry in enumerate(entries):
        tied = any(abs(float(values[j] - values[m])) < 2 * tol for m in (j - 1, j + 1) if 0 <= m <= k)
        if not tied:
            assert entry["token"] == ref.token_text(int(top_ids[j])), (j, entry, ref.token_text(int(top_ids[j])))
