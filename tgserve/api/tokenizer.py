"""The model's tokenizer as the API uses it: encode prompts, decode ids, special-token facts."""

from __future__ import annotations


class Tokenizer:
    def __init__(self, folder: str):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(folder)
        # the Rust tokenizer directly: its decode is several times cheaper than the Python wrapper's
        self.backend = getattr(self.hf, "backend_tokenizer", None)
        self.special_ids = frozenset(self.hf.all_special_ids)
        self.vocab_size = len(self.hf)  # ids a request may name (added tokens included)
        self.eos_token_ids = tuple(sorted(_eos_ids(folder, self.hf)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, stop) per token, the offsets in bytes of the UTF-8 text (TGI's /tokenize)."""
        if self.backend is not None:
            encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
            ids, offsets = encoding.ids, encoding.offsets
        else:
            encoding = self.hf(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        byte_at = [0]  # byte offset of each character
        for ch in text:
            byte_at.append(byte_at[-1] + len(ch.encode()))
        return [(i, byte_at[a], byte_at[b]) for i, (a, b) in zip(ids, offsets)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def decode_each(self, ids: list[int]) -> list[str]:
        """Each id's own text (special tokens kept), in one call."""
        if self.backend is not None:
            return self.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
        return [self.decode([i]) for i in ids]

    def decode_generated(self, prompt_ids: list[int], generated_ids: list[int]) -> str:
        """The final text of a generation. Decoded behind the prompt's last token, as TGI does, so
        tokenizers that drop a leading space at the start of a text keep it here."""
        prefix = list(prompt_ids[-1:])
        head = self.decode(prefix, skip_special_tokens=True)
        return self.decode(prefix + list(generated_ids), skip_special_tokens=True)[len(head):]


def _eos_ids(folder: str, hf_tokenizer) -> set[int]:
    """The ids `transformers.generate` stops on, else the tokenizer's EOS."""
    from tgserve.weights.locate import generation_eos_ids

    return generation_eos_ids(folder) or (
        {hf_tokenizer.eos_token_id} if hf_tokenizer.eos_token_id is not None else set())
