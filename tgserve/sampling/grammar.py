"""Constrained decoding in the engine: one llguidance matcher per sequence, a token mask per step.

A matcher starts building when its request arrives (during the prefill); each step, the masks of
the constrained rows are filled in a worker thread while the model's forward pass runs (llguidance
releases the GIL), applied to those rows only, and each matcher advances with its chosen token.
Unconstrained rows never wait on a grammar beyond that overlap. Why llguidance: tgserve/grammars.py.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tgserve.grammars import to_llguidance
from tgserve.params import GrammarSpec
from tgserve.sampling.sampler import GrammarMask, SequenceView

log = logging.getLogger(__name__)


class _PendingMask:
    def __init__(self, future: Future, rows: torch.Tensor, vocab_size: int):
        self.future, self.rows, self.vocab_size = future, rows, vocab_size

    def result(self) -> GrammarMask:
        bitmask = self.future.result()  # [n, words] int32, one bit per token
        return GrammarMask(self.rows, lambda scores: _apply(scores, bitmask, self.vocab_size))


_SHIFTS = torch.arange(32, dtype=torch.int32)


def _apply(scores: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """scores: [n, vocab]; bitmask: [n, ceil(vocab / 32)]. Banned tokens become -inf, all rows at once."""
    allowed = ((bitmask[:, :, None] >> _SHIFTS.to(bitmask.device)) & 1).view(bitmask.shape[0], -1)[:, :vocab_size]
    return scores.masked_fill(allowed.to(scores.device) == 0, float("-inf"))


class LLGuidanceBackend:
    """The engine's grammar state: one matcher per constrained sequence, masks per step."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance

        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, frozenset(eos_ids)
        self._executor = llguidance.LLExecutor()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")  # matchers + masks, in order
        self._matchers: dict[str, Future] = {}
        self._words = (vocab_size + 31) // 32

    def begin(self, request_id: str, spec: GrammarSpec, generated: list[int]) -> None:
        """Build the matcher in the background as soon as the request arrives (during its prefill)."""
        self._matchers[request_id] = self._pool.submit(self._build, spec, generated)

    def _build(self, spec: GrammarSpec, generated: list[int]):
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer, to_llguidance(spec), log_level=0)
        for token in generated:  # a resumed sequence: replay what it had generated
            if token not in self.eos_ids:
                matcher.consume_token(token)
        return matcher

    def start(self, seqs: list[SequenceView]) -> _PendingMask | None:
        picked = [(i, s) for i, s in enumerate(seqs) if s.sampling.grammar is not None]
        if not picked:
            return None
        for _, s in picked:
            if s.request_id not in self._matchers:  # a fork: its own matcher, from the same prompt
                self.begin(s.request_id, s.sampling.grammar, s.token_ids[s.num_prompt_tokens:])
        futures = [self._matchers[s.request_id] for _, s in picked]
        rows = torch.tensor([i for i, _ in picked], dtype=torch.long)
        return _PendingMask(self._pool.submit(self._fill, futures), rows, self.vocab_size)

    def _fill(self, futures: list[Future]) -> torch.Tensor:
        import llguidance.torch as llt

        bitmask = torch.full((len(futures), self._words), -1, dtype=torch.int32)
        matchers = [f.result() for f in futures]
        llt.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        for i, m in enumerate(matchers):
            if m.is_error():  # cannot happen with masked sampling; end the sequence rather than loop
                log.warning("grammar matcher failed: %s; only EOS is allowed now", m.get_error())
                bitmask[i] = 0
                for eos in self.eos_ids:
                    bitmask[i, eos // 32] |= torch.tensor(1 << (eos % 32)).to(torch.int32)
        return bitmask

    def accept(self, seqs: list[SequenceView], tokens: list[int]) -> None:
        for s, token in zip(seqs, tokens):
            if s.sampling.grammar is not None and token not in self.eos_ids:
                self._matchers[s.request_id].result().consume_token(token)

    def release(self, request_ids: list[str]) -> None:
        for r in request_ids:
            self._matchers.pop(r, None)
