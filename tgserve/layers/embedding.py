"""Token embedding and LM head split by vocabulary rows over tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgserve import distributed as dist
from tgserve.layers import cpu_kernels
from tgserve.quant import Unquantized


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of vocabulary rows (the last range padded with zeros)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        tp = dist.tp_size()
        self.vocab_size = vocab_size
        self.vocab_local = -(-vocab_size // tp)
        self.vocab_start = dist.tp_rank() * self.vocab_local
        self.weight = nn.Parameter(torch.zeros(self.vocab_local, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding shape {tuple(loaded.shape)} does not match vocab {self.vocab_size}")
        rows = min(self.vocab_local, self.vocab_size - self.vocab_start)
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows).to(param.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if dist.tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return dist.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (gathered from every rank)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__(vocab_size, hidden_size, dtype)
        self.quant = Unquantized()  # the LM head is never quantized, but may be repacked

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's rows (same vocab split, so the same shard on every rank)."""
        self.weight = embedding.weight
        self.quant.shared = True  # its plain weight is the embedding's: kept for the small-batch kernel at no cost

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        panels = getattr(self, "panel_weight", None)
        if panels is not None:  # float32 logits straight from the GEMM: the values .float() would give
            logits = cpu_kernels.gemm_panel(hidden, panels, None, torch.float32)
        else:
            logits = self.quant.apply(self, hidden, None)  # [rows, vocab_local]
        if dist.tp_size() > 1:
            logits = dist.all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]
