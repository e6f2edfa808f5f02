"""Incremental detokenization: one text piece per generated token, never a broken character.

TGI's scheme: decode a short window behind the new token twice (without and with it) and emit the
difference, unless it ends in U+FFFD (a multi-byte character not yet complete), in which case the
token's text is "" and the bytes arrive with a later token.
"""

from __future__ import annotations

from tgserve.api.tokenizer import Tokenizer

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first generated one (spacing and merges)


class IncrementalDetokenizer:
    __slots__ = ("tokenizer", "ids", "prefix_offset", "read_offset")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset])
        after = decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            text = after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.prefix_offset > 64:  # keep the window short: drop ids no window reads any more
                del self.ids[:self.prefix_offset]
                self.read_offset -= self.prefix_offset
                self.prefix_offset = 0
            return text
        return ""
