"""TGI's own Python client (`text-generation`, from its own virtualenv) generates and streams, and
drives every parameter it exposes."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.slow

CLIENT_SCRIPT = r'''
import json, sys
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType

client = Client(sys.argv[1], timeout=120)
prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
response = client.generate(prompt, max_new_tokens=12)
stream = list(client.generate_stream(prompt, max_new_tokens=12))
sampled = client.generate(prompt, max_new_tokens=5, do_sample=True, seed=7, top_k=20, top_p=0.9, temperature=0.8)
try:
    client.generate(prompt, max_new_tokens=5, truncate=100000)
    error = None
except ValidationError as e:
    error = str(e)

# every parameter the client exposes, as TGI's own `*_all_params` integration tests send them
every = client.generate(prompt, max_new_tokens=10, repetition_penalty=1.2, frequency_penalty=0.1,
                        return_full_text=True, stop_sequences=["test"], temperature=0.5, top_p=0.9, top_k=10,
                        truncate=10, typical_p=0.9, watermark=True, decoder_input_details=True, seed=0,
                        top_n_tokens=2)
best = client.generate(prompt, max_new_tokens=6, do_sample=True, best_of=2)
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
constrained = client.generate(prompt, max_new_tokens=30, grammar=Grammar(type=GrammarType.Json, value=schema))
stream_all = list(client.generate_stream(prompt, max_new_tokens=6, repetition_penalty=1.1, frequency_penalty=0.2,
                                         temperature=0.7, top_p=0.8, top_k=5, typical_p=0.8, watermark=True, seed=3,
                                         top_n_tokens=2, stop_sequences=["\n"], truncate=20))
stream_regex = list(client.generate_stream(prompt, max_new_tokens=10,
                                           grammar=Grammar(type=GrammarType.Regex, value="[A-Z][a-z]+")))
print(json.dumps({
    "every_text": every.generated_text,
    "every_prefill": [[t.id, t.logprob] for t in every.details.prefill],
    "every_top": [[t.id for t in top] for top in every.details.top_tokens],
    "every_tokens": len(every.details.tokens),
    "every_seed": every.details.seed,
    "best_seeds": [best.details.seed] + [s.seed for s in best.details.best_of_sequences],
    "best_texts": len(best.details.best_of_sequences),
    "constrained": constrained.generated_text,
    "stream_all_top": [len(r.top_tokens) for r in stream_all],
    "stream_all_ids": [r.token.id for r in stream_all],
    "stream_regex": stream_regex[-1].generated_text,
    "text": response.generated_text,
    "finish_reason": response.details.finish_reason,
    "generated_tokens": response.details.generated_tokens,
    "token_ids": [t.id for t in response.details.tokens],
    "stream_ids": [r.token.id for r in stream],
    "stream_text": stream[-1].generated_text,
    "stream_details": stream[-1].details.finish_reason,
    "sampled_seed": sampled.details.seed,
    "error": error,
}))
'''


def client_python() -> str:
    path = os.environ.get("TGSERVE_CLIENT_PYTHON", ".venv-clients/bin/python")
    if not os.path.exists(path):
        pytest.fail(f"TGI's client venv is missing ({path}); `make test` creates it")
    return path


def test_text_generation_client_generates_and_streams(smollm2_server):
    result = subprocess.run([client_python(), "-c", CLIENT_SCRIPT, smollm2_server.url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"]
    assert out["generated_tokens"] == len(out["token_ids"]) >= 1
    assert out["finish_reason"] in ("length", "eos_token")
    assert out["stream_ids"] == out["token_ids"]
    assert out["stream_text"] == out["text"]
    assert out["sampled_seed"] == 7
    assert out["error"] is not None and "truncate" in out["error"]
    # every parameter at once: the prompt (16 tokens) is truncated to 10, which come back as prefill
    assert out["every_text"].startswith(prompt_text())
    assert len(out["every_prefill"]) == 10 and out["every_prefill"][0][1] is None
    assert all(lp is not None for _, lp in out["every_prefill"][1:])
    assert len(out["every_top"]) == out["every_tokens"] and all(len(t) >= 1 for t in out["every_top"])
    assert out["every_seed"] == 0
    assert len(set(out["best_seeds"])) == 2 and out["best_texts"] == 1
    assert json.loads(out["constrained"])["city"]
    # the alternatives come from the processed distribution: top-k 5 and typical-p may leave one
    assert out["stream_all_ids"] and all(n >= 1 for n in out["stream_all_top"])
    assert re.fullmatch("[A-Z][a-z]+", out["stream_regex"])


def prompt_text() -> str:
    return "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
