"""KV-cache block accounting: which blocks are free and which sequence owns which.

Pure bookkeeping on block ids; the tensors live in the runner. Knows nothing of scheduling policy.
Block 0 is the null block (see layers/attention.py) and is never handed out.
"""

from __future__ import annotations

from tgserve.engine.sequence import Sequence


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is the null block)")
        self.num_blocks = num_blocks
        # a stack: the most recently freed block is reused first (it is warm in cache)
        self._free = list(range(num_blocks - 1, 0, -1))
        self._owned = [False] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), "allocate() past the free pool; check can_allocate first"
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._owned[b] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._owned[b], f"block {b} freed twice"
            self._owned[b] = False
            self._free.append(b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))

    def can_allocate(self, num_blocks: int, reserve: int = 0) -> bool:
        return num_blocks + reserve <= self.pool.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens; False (and no change) if it can't."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.pool.num_free:
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
