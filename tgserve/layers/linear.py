"""Linear layers that know their tensor-parallel split and take their own shard of a checkpoint.

Models declare layers by their full sizes; each layer keeps only its rank's part. Every parameter
carries a `weight_loader(param, full_tensor, shard_id)` so that loading is one loop over the
checkpoint. The matmul itself belongs to the layer's `QuantMethod`.
"""

from __future__ import annotations

import torch
from torch import nn

from tgserve import distributed as dist
from tgserve.quant import QuantMethod, Unquantized


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Replicated parameters (norms, biases of row-parallel layers): copy the whole tensor."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype, quant: QuantMethod | None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_local, out_local, dtype  # this rank's part
        self.quant = quant or Unquantized()
        self.quant.create_weights(self, in_local, out_local, dtype)
        self.weight.weight_loader = self.weight_loader
        self.bias = nn.Parameter(torch.zeros(out_local, dtype=dtype), requires_grad=False) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        raise NotImplementedError

    def _load(self, param: nn.Parameter, shard: torch.Tensor, out_offset: int | None = None) -> None:
        shard = shard.to(param.dtype)
        if param is self.weight:
            self.quant.load(param, shard, out_offset)
        else:
            target = param.data if out_offset is None else param.data.narrow(0, out_offset, shard.shape[0])
            target.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant: QuantMethod | None = None):
        super().__init__(in_features, out_features, bias, dtype, quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        self._load(param, loaded)


class ColumnParallelLinear(LinearBase):
    """Splits the output features over ranks; the output stays split (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant: QuantMethod | None = None):
        self.out_local = dist.divide(out_features, dist.tp_size(), "output features")
        super().__init__(in_features, self.out_local, bias, dtype, quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        self._load(param, loaded.narrow(0, dist.tp_rank() * self.out_local, self.out_local))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (e.g. gate and up); shard_id = index."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant: QuantMethod | None = None):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, dtype, quant)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this [gate | up] layer's output, computed with the matmul where the
        quantization method has a kernel for it (the projection is never stored); None: apply the
        layer, then the activation."""
        return self.quant.apply_silu_mul(self, x) if self.bias is None else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # the checkpoint already fuses the parts (Phi-3's gate_up_proj)
            for part, piece in enumerate(loaded.split(self.out_sizes, dim=0)):
                self.weight_loader(param, piece, part)
            return
        tp = dist.tp_size()
        local = [n // tp for n in self.out_sizes]
        offset = sum(local[:shard_id])
        self._load(param, loaded.narrow(0, dist.tp_rank() * local[shard_id], local[shard_id]), offset)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads (`dist.head_shard`: whole KV groups per rank, or KV
    heads replicated when ranks outnumber them).

    shard_id is "q", "k" or "v". Local output layout: [q heads | k heads | v heads] × head_dim.
    The attention output projection takes `out_split` (this rank's query features) as its input split.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32, quant: QuantMethod | None = None):
        self.head_dim = head_dim
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
        self.heads = dist.head_shard(num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads = self.heads.count, self.heads.kv_count
        self.kv_head_start = self.heads.kv_start
        out_local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, out_local, bias, dtype, quant)

    @property
    def out_split(self) -> tuple[int, int]:
        """(first, count) of this rank's features in the full attention output."""
        return self.heads.start * self.head_dim, self.heads.count * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        d = self.head_dim
        if shard_id is None:  # the checkpoint already fuses q, k and v (Phi-3's qkv_proj)
            sizes = [self.total_heads * d, self.total_kv_heads * d, self.total_kv_heads * d]
            for part, piece in zip("qkv", loaded.split(sizes, dim=0)):
                self.weight_loader(param, piece, part)
            return
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            self._load(param, loaded.narrow(0, self.heads.start * d, q_size), 0)
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            self._load(param, loaded.narrow(0, self.kv_head_start * d, kv_size), offset)
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")


class RowParallelLinear(LinearBase):
    """Splits the input features over ranks and sums the partial outputs (all-reduce).

    `split` = (first, count) of this rank's input features when they are not an equal share (an
    attention output projection takes its QKV layer's `out_split`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant: QuantMethod | None = None,
                 split: tuple[int, int] | None = None):
        if split is None:
            local = dist.divide(in_features, dist.tp_size(), "input features")
            split = (dist.tp_rank() * local, local)
        self.in_start, self.in_local = split
        super().__init__(self.in_local, out_features, bias, dtype, quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param is self.bias:  # added once, after the reduction
            self._load(param, loaded)
        else:
            self._load(param, loaded.narrow(1, self.in_start, self.in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dist.all_reduce(self.quant.apply(self, x, None))
        return y if self.bias is None else y + self.bias
