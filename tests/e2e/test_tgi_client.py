"""TGI's own Python client (`text-generation`, from its own virtualenv) generates and streams."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.slow

CLIENT_SCRIPT = r'''
import json, sys
from text_generation import Client
from text_generation.errors import ValidationError

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
print(json.dumps({
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
