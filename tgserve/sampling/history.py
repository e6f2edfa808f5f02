"""Token counts per penalised sequence, kept across steps so no step re-reads a whole history.

A sequence gets a row of the table the first time it samples with a penalty (filled from all its
tokens so far, in one scatter for every newcomer of the step); after each step the chosen tokens
are added in one more scatter. Beside the dense counts, each row lists its distinct tokens, so
a step's penalties visit the few hundred tokens a sequence has seen, not the whole vocabulary.
Rows are reused once their sequence ends.
"""

from __future__ import annotations

import numpy as np
import torch


class TokenCounts:
    def __init__(self, vocab_size: int, device: torch.device, capacity: int = 8, width: int = 256):
        self.vocab_size, self.device = vocab_size, device
        self.table = torch.zeros(capacity, vocab_size, dtype=torch.float32, device=device)  # occurrences
        self.distinct = torch.zeros(capacity, width, dtype=torch.long, device=device)  # each row's seen tokens
        self.num_distinct = torch.zeros(capacity, dtype=torch.long, device=device)
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
            self._list_distinct(fresh)
        return torch.tensor([self._slots[r] for r in request_ids], dtype=torch.long, device=self.device)

    def seen(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (position in `rows`, token, count) of every token these rows have seen, flat."""
        n = self.num_distinct.index_select(0, rows)
        width = int(n.max())
        tokens = self.distinct.index_select(0, rows)[:, :width]
        valid = torch.arange(width, device=self.device)[None, :] < n[:, None]
        which = torch.arange(len(rows), device=self.device)[:, None].expand(-1, width)[valid]
        tokens = tokens[valid]
        return which, tokens, self.table[rows.index_select(0, which), tokens]

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """One more occurrence of `tokens[i]` in row `rows[i]` (each row at most once per call)."""
        first = self.table[rows, tokens] == 0
        self.table.index_put_((rows, tokens), torch.ones(len(rows), device=self.device), accumulate=True)
        if bool(first.any()):
            new_rows, new_tokens = rows[first], tokens[first]
            at = self.num_distinct.index_select(0, new_rows)
            self._widen(int(at.max()) + 1)
            self.distinct[new_rows, at] = new_tokens
            self.num_distinct.index_add_(0, new_rows, torch.ones_like(new_rows))

    def release(self, request_ids: list[str]) -> None:
        for r in request_ids:
            slot = self._slots.pop(r, None)
            if slot is not None:
                self._free.append(slot)

    def _list_distinct(self, fresh: torch.Tensor) -> None:
        rows, tokens = (self.table.index_select(0, fresh) > 0).nonzero(as_tuple=True)  # sorted by row
        per_row = torch.bincount(rows, minlength=len(fresh))
        self._widen(int(per_row.max()))
        starts = torch.cumsum(per_row, 0) - per_row
        position = torch.arange(len(rows), device=self.device) - starts[rows]
        self.distinct[fresh[rows], position] = tokens
        self.num_distinct[fresh] = per_row

    def _widen(self, width: int) -> None:
        if width > self.distinct.shape[1]:
            wider = torch.zeros(self.distinct.shape[0], max(width, 2 * self.distinct.shape[1]), dtype=torch.long,
                                device=self.device)
            wider[:, :self.distinct.shape[1]] = self.distinct
            self.distinct = wider

    def _grow(self, needed: int) -> None:
        capacity = self.table.shape[0]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        table = torch.zeros(new_capacity, self.vocab_size, dtype=torch.float32, device=self.device)
        table[:capacity] = self.table
        distinct = torch.zeros(new_capacity, self.distinct.shape[1], dtype=torch.long, device=self.device)
        distinct[:capacity] = self.distinct
        num_distinct = torch.zeros(new_capacity, dtype=torch.long, device=self.device)
        num_distinct[:capacity] = self.num_distinct
        self.table, self.distinct, self.num_distinct = table, distinct, num_distinct
        self._free = list(range(new_capacity - 1, capacity - 1, -1)) + self._free
