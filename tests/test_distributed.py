"""tgserve.distributed: how heads split over ranks, and a group that really ends at shutdown."""

from __future__ import annotations

import glob
import json
import os
import traceback

import pytest

from tgserve import distributed

from conftest import free_port, run_ranks


def shards(heads: int, kv: int, tp: int) -> list[tuple[int, int, int, int]]:
    out = []
    for rank in range(tp):
        distributed._rank, distributed._world_size = rank, tp
        try:
            s = distributed.head_shard(heads, kv)
        finally:
            distributed._rank, distributed._world_size = 0, 1
        out.append((s.start, s.count, s.kv_start, s.kv_count))
    return out


def test_whole_kv_groups_go_to_ranks_as_evenly_as_they_go():
    assert shards(8, 8, 2) == [(0, 4, 0, 4), (4, 4, 4, 4)]
    assert shards(9, 3, 2) == [(0, 6, 0, 2), (6, 3, 2, 1)]  # SmolLM2: 3 groups of 3 query heads
    assert shards(5, 5, 2) == [(0, 3, 0, 3), (3, 2, 3, 2)]


def test_fewer_kv_heads_than_ranks_replicate_each_kv_head():
    assert shards(8, 1, 2) == [(0, 4, 0, 1), (4, 4, 0, 1)]
    assert shards(8, 2, 4) == [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]


@pytest.mark.parametrize("heads, kv, tp", [(3, 1, 2), (6, 2, 3), (8, 2, 3), (8, 3, 2)])
def test_a_split_that_cannot_work_is_refused_with_the_numbers(heads, kv, tp):
    with pytest.raises(ValueError, match=f"{heads}|{kv}"):
        shards(heads, kv, tp)


def _worker(rank: int, port: int, out: str) -> None:
    try:
        distributed.init(rank, 2, "gloo", f"tcp://127.0.0.1:{port}")
        import torch
        import torch.distributed.fsdp  # noqa: F401  (transformers' modeling_utils imports it)

        distributed.all_reduce(torch.ones(2))
        distributed.broadcast_object({"step": 1})
        distributed.min_over_ranks(rank)
        torch.distributed.destroy_process_group()  # as a caller other than distributed.shutdown may
        threads = [open(t).read().strip() for t in glob.glob("/proc/self/task/*/comm")]
        with open(f"{out}.{rank}", "w") as f:
            json.dump(threads, f)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads thread names from /proc")
def test_a_destroyed_group_ends_its_threads(tmp_path):
    """Nothing of ours (nor FSDP's import) keeps the group alive past destroy_process_group:
    otherwise its gloo threads outlive it and abort the process at exit (SIGABRT)."""
    out = str(tmp_path / "threads")
    run_ranks(_worker, (free_port(), out), timeout=120)
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            threads = json.load(f)
        assert not [t for t in threads if "gloo" in t or "tcpstore" in t], threads
