"""Text work of the API: incremental detokenization and stop-sequence matching."""

from __future__ import annotations

import pytest

from tgserve.api.detokenizer import IncrementalDetokenizer
from tgserve.api.stop import StopMatcher
from tgserve.api.tokenizer import Tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "Unicode: caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \u20ac\u00a3\u00a5",
    "emoji \U0001f600\U0001f680 mixed with text",
    "  leading spaces and\nnew lines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir) -> Tokenizer:
    return Tokenizer(tiny_llama_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Prompt before. ")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_a_split_multibyte_character_arrives_whole_with_a_later_token(tokenizer):
    ids = tokenizer.encode("\u65e5\u672c")  # not in the tiny vocabulary: byte-level tokens
    assert len(ids) > 2
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.step(i) for i in ids]
    assert "" in pieces
    assert "".join(pieces) == "\u65e5\u672c"


def test_long_generations_keep_a_short_window(tokenizer):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.step(i) for i in ids)
    assert text == tokenizer.decode(ids)
    assert len(detok.ids) < 80


def test_final_text_skips_special_tokens_and_keeps_leading_space(tokenizer):
    prompt = tokenizer.encode("Hello")
    generated = tokenizer.encode(" world") + list(tokenizer.eos_token_ids)
    assert tokenizer.decode_generated(prompt, generated) == " world"


def test_stop_matches_inside_one_piece():
    m = StopMatcher(("stop",))
    assert not m.feed("no match here")
    assert m.feed("a stop sign")


def test_stop_matches_across_pieces():
    m = StopMatcher(("END", "xyz"))
    assert not m.feed("the E")
    assert not m.feed("N")
    assert m.feed("D of it")


def test_stop_does_not_match_pieces_that_only_resemble_it():
    m = StopMatcher(("abc",))
    for piece in ("a", "b", "x", "c", "ab", "bc"):
        assert not m.feed(piece)
