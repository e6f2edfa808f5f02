"""Token counts per penalised sequence, kept across steps so no step re-reads a whole history.

A sequence gets a row of the table the first time it samples with a penalty (filled from all its
tokens so far, in one scatter for every newcomer of the step); after each step the chosen tokens
are added in one more scatter. Rows are reused once their sequence ends.
"""

from __future__ import annotations

import numpy as np
import torch


class TokenCounts:
    def __init__(self, vocab_size: int, device: torch.device, capacity: int = 8):
        self.vocab_size, self.device = vocab_size, device
        self.table = torch.zeros(capacity, vocab_size, dtype=torch.float32, device=device)
        self._slots: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slots)

    def rows(self, request_ids: list[str], histories: list[list[int]]) -> torch.Tensor:
        """Table rows of these sequences, giving newcomers a row filled from their `histories`."""
        new = [i for i, r in enumerate(request_ids) if r not in self._slots]
        if new:
            self._grow(len(self._slots) + len(new))
            for i in new:
                self._slots[request_ids[i]] = self._free.pop()
            fresh = torch.tensor([self._slots[request_ids[i]] for i in new], device=self.device)
            self.table[fresh] = 0
            lengths = np.array([len(histories[i]) for i in new])
            tokens = np.concatenate([np.asarray(histories[i], dtype=np.int64) for i in new])
            slot_of_token = np.repeat(fresh.cpu().numpy(), lengths)
            self.table.index_put_((torch.from_numpy(slot_of_token).to(self.device),
                                   torch.from_numpy(tokens).to(self.device)),
                                  torch.ones(len(tokens), device=self.device), accumulate=True)
        return torch.tensor([self._slots[r] for r in request_ids], dtype=torch.long, device=self.device)

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """One more occurrence of `tokens[i]` in row `rows[i]`."""
        self.table.index_put_((rows, tokens), torch.ones(len(rows), device=self.device), accumulate=True)

    def release(self, request_ids: list[str]) -> None:
        for r in request_ids:
            slot = self._slots.pop(r, None)
            if slot is not None:
                self._free.append(slot)

    def _grow(self, needed: int) -> None:
        capacity = self.table.shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        table = torch.zeros(new_capacity, self.vocab_size, dtype=torch.float32, device=self.device)
        table[:capacity] = self.table
        self.table = table
        self._free = list(range(new_capacity - 1, capacity - 1, -1)) + self._free
