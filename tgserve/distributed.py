"""Tensor-parallel rank facts and collectives: the only module that calls torch.distributed.

Rank and world size are set once per process by `init`; at world size 1 every collective is a
no-op, so single-process code and sharded code are the same code. Besides the model's collectives
(on the default group: gloo on CPU, nccl on CUDA), a sharded engine's rank 0 sends each step's
inputs to the other ranks as a Python object over a gloo group (`broadcast_object`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

_rank = 0
_world_size = 1
_control = None  # the gloo group objects travel on (None: the default group, when that is gloo)

# how long a collective may wait for a rank that is alive but silent (a dead one fails it at once)
TIMEOUT = datetime.timedelta(minutes=30)


def init(rank: int, world_size: int, backend: str | None = None, init_method: str | None = None) -> None:
    """Join the process group when world_size > 1: rendezvous at `init_method` (tcp://host:port),
    else from MASTER_ADDR / MASTER_PORT."""
    global _rank, _world_size, _control
    _rank, _world_size = rank, world_size
    if world_size > 1 and not dist.is_initialized():
        # FSDP's import (transformers' modeling_utils imports it) keeps a reference to the default
        # group when the group already exists; that group then outlives destroy_process_group and
        # its gloo threads abort the process at exit. Imported first, it holds none.
        import torch.distributed.fsdp  # noqa: F401

        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=TIMEOUT)
        # gloo: the default group itself (None); holding its object here would keep it alive past
        # a destroy_process_group that another caller makes
        _control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)


def shutdown() -> None:
    global _control
    _control = None
    if dist.is_initialized():
        dist.destroy_process_group()


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


def broadcast_object(obj: object = None) -> object:
    """Rank 0's `obj` on every rank (pickled); the other ranks pass nothing and get it."""
    if _world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (e.g. the KV blocks that fit on every rank)."""
    if _world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_control)
    return int(t.item())


def divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({parts})")
    return n // parts


@dataclass(frozen=True, slots=True)
class HeadShard:
    """This rank's attention heads: query heads [start, start + count), KV heads [kv_start, kv_start + kv_count)."""

    start: int
    count: int
    kv_start: int
    kv_count: int


def head_shard(num_heads: int, num_kv_heads: int | None = None) -> HeadShard:
    """Heads go to ranks in whole key/value groups, as evenly as they go (3 groups over 2 ranks: 2
    and 1), so each rank's query heads read only its own KV heads. With fewer KV heads than ranks,
    each KV head is replicated on tp / kv_heads ranks, which split its query heads equally; a size
    for which neither works is refused."""
    kv = num_kv_heads or num_heads
    tp, r = _world_size, _rank
    if num_heads % kv:
        raise ValueError(f"attention heads ({num_heads}) are not a multiple of key/value heads ({kv})")
    group = num_heads // kv
    if kv >= tp:
        base, extra = divmod(kv, tp)
        kv_count, kv_start = base + (r < extra), r * base + min(r, extra)
        return HeadShard(kv_start * group, kv_count * group, kv_start, kv_count)
    if tp % kv or num_heads % tp:
        raise ValueError(
            f"{num_heads} attention heads with {kv} key/value heads cannot be split over {tp} ranks: "
            f"the tensor-parallel size must be at most {kv}, or a multiple of {kv} that divides {num_heads}")
    per = num_heads // tp
    return HeadShard(r * per, per, r // (tp // kv), 1)
