"""Prefix caching through `tgserve serve`: on by default, a request whose prompt starts with an
earlier one's reuses its blocks (counted in /metrics as tgserve_prefix_cache_hit_tokens) and still
gets transformers' greedy tokens; `--no-prefix-caching` computes every prompt whole."""

from __future__ import annotations

import re

import httpx
import pytest
from transformers import AutoTokenizer

from conftest import TINY_SERVER_ARGS
from models.families import served_greedy, transformers_greedy

pytestmark = pytest.mark.slow

SYSTEM = ("You are a helpful assistant. Answer briefly and precisely, and say so when you do not know. "
          "Never invent facts; prefer short sentences. ")
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Why is the sky blue?"]


def hit_tokens(server) -> int:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return int(re.search(r"^tgserve_prefix_cache_hit_tokens (\d+)$", text, re.M).group(1))


@pytest.mark.parametrize("caching", [True, False], ids=["default", "no-prefix-caching"])
def test_requests_sharing_a_system_prompt(tiny_llama_dir, server_factory, caching):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = [SYSTEM + q for q in QUESTIONS]
    expected = transformers_greedy(tiny_llama_dir, [tok(t).input_ids for t in texts], 8)
    server = server_factory(tiny_llama_dir, *TINY_SERVER_ARGS, *([] if caching else ["--no-prefix-caching"]))
    try:
        assert served_greedy(server, texts[:1], 8) == expected[:1]
        assert served_greedy(server, texts[1:], 8) == expected[1:]  # these two start with the first's blocks
        shared = len(tok(SYSTEM).input_ids) // 16 * 16
        assert shared >= 16
        if caching:
            assert hit_tokens(server) >= 2 * shared
        else:
            assert hit_tokens(server) == 0
    finally:
        server.stop()
