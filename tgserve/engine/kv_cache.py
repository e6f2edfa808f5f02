"""KV-cache block accounting: which blocks are free, which sequences hold each one.

Pure bookkeeping on block ids; the tensors live in the runner. Knows nothing of scheduling policy.
Block 0 is the null block (see layers/attention.py) and is never handed out.

Blocks are reference-counted so that sequences of one request (best_of, n) share their prompt's
blocks. A shared block is copied on write: before a sequence writes into a block another
sequence also holds, it gets a fresh block, and the copy (source, destination) is queued for the
runner to perform before the step's forward pass.
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
        self._refs = [0] * num_blocks

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
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} shared while free"
            self._refs[b] += 1

    def refs(self, block: int) -> int:
        return self._refs[block]

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds goes back to the pool."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self._copies: list[tuple[int, int]] = []  # (source, destination) not yet done by the runner

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_ids))

    def can_allocate(self, num_blocks: int, reserve: int = 0) -> bool:
        return num_blocks + reserve <= self.pool.num_free

    def _shared_written(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Indices in seq's block table of shared blocks that writing up to `num_tokens` touches."""
        first = seq.num_computed_tokens // self.block_size
        last = min(len(seq.block_ids), -(-num_tokens // self.block_size))
        return [i for i in range(first, last) if self.pool.refs(seq.block_ids[i]) > 1]

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Make `seq`'s tokens [num_computed_tokens, num_tokens) writable: grow its block table and
        copy the shared blocks it will write into. False (and no change) if the pool is too small."""
        shared = self._shared_written(seq, num_tokens)
        need = self.blocks_needed(seq, num_tokens)
        if need + len(shared) > self.pool.num_free:
            return False
        for i in shared:
            [fresh] = self.pool.allocate(1)
            self._copies.append((seq.block_ids[i], fresh))
            self.pool.free([seq.block_ids[i]])
            seq.block_ids[i] = fresh
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` holds every block of `parent` (its computed prompt, its cross-attention K/V),
        shared until written (cross blocks are never written again)."""
        assert not child.block_ids
        self.pool.share(parent.block_ids)
        child.block_ids = list(parent.block_ids)
        self.pool.share(parent.cross_block_ids)
        child.cross_block_ids = list(parent.cross_block_ids)

    def cross_blocks_needed(self, seq: Sequence) -> int:
        """Blocks an encoder-decoder sequence still needs for its encoder's K/V."""
        if seq.encoder_ids is None:
            return 0
        return max(0, -(-len(seq.encoder_ids) // self.block_size) - len(seq.cross_block_ids))

    def allocate_cross(self, seq: Sequence) -> bool:
        need = self.cross_blocks_needed(seq)
        if need > self.pool.num_free:
            return False
        seq.cross_block_ids.extend(self.pool.allocate(need))
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """The block copies the next forward pass needs: one per destination (the latest), and
        none into a block that was freed again before the step ran."""
        latest = {dst: src for src, dst in self._copies}
        self._copies = []
        return [(src, dst) for dst, src in latest.items() if self.pool.refs(dst) > 0]

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        self.pool.free(seq.cross_block_ids)
        seq.block_ids, seq.cross_block_ids = [], []
        seq.encoded = False
