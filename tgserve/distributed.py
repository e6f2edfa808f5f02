"""Tensor-parallel rank facts and collectives: the only module that calls torch.distributed.

Rank and world size are set once per process by `init`; at world size 1 every collective is a
no-op, so single-process code and sharded code are the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_rank = 0
_world_size = 1


def init(rank: int, world_size: int, backend: str | None = None) -> None:
    """Join the process group (rendezvous from MASTER_ADDR/MASTER_PORT) when world_size > 1."""
    global _rank, _world_size
    _rank, _world_size = rank, world_size
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size)


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place. gloo reduces bf16 slowly and loosely, so it reduces in fp32."""
    if _world_size == 1:
        return x
    if x.device.type == "cpu" and x.dtype != torch.float32:
        y = x.float()
        dist.all_reduce(y)
        x.copy_(y)
    else:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (same shape on every rank)."""
    if _world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({parts})")
    return n // parts
