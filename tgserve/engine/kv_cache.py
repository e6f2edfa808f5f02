"""KV-cache block accounting: which blocks are free, which sequences hold each one.

Pure bookkeeping on block ids; the tensors live in the runner. Knows nothing of scheduling policy.
Block 0 is the null block (see layers/attention.py) and is never handed out.

Blocks are reference-counted so that sequences of one request (best_of, n) share their prompt's
blocks. A shared block is copied on write: before a sequence writes into a block another
sequence also holds, it gets a fresh block, and the copy (source, destination) is queued for the
runner to perform before the step's forward pass.

Automatic prefix caching: once a block is full and computed, it is registered under a hash of
every token from the sequence's start to the block's end (a chain: each block's hash covers its
tokens and its predecessor's hash). A block nobody holds any more keeps its K/V and its hash, in
least-recently-used order, and counts as free: it is handed out again (forgetting its hash) only
when no block without one is left. A new sequence whose first full blocks hash to registered ones
takes them and starts computing after them; a preempted sequence finds its own blocks again the
same way. Registered blocks are never written (a sequence only writes past what it computed, and
a match always leaves at least its last token to compute), so sharing them needs no copy.
"""

from __future__ import annotations

from collections import OrderedDict

from tgserve.engine.sequence import Sequence

_ROOT_HASH = 0x9E3779B97F4A7C15  # the "previous block" of a sequence's first block


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is the null block)")
        self.num_blocks = num_blocks
        # a stack: the most recently freed block is reused first (it is warm in cache)
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs = [0] * num_blocks
        # prefix caching: blocks holding a registered prefix's K/V, by hash and back; those nobody
        # holds wait in `_cached`, least recently used first, until a block is needed
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: empty ones and cached ones nobody holds."""
        return len(self._free) + len(self._cached)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        assert n <= self.num_free, "allocate() past the free pool; check can_allocate first"
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # evict the least recently used cached prefix block
                b, _ = self._cached.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} shared while free"
            self._refs[b] += 1

    def refs(self, block: int) -> int:
        return self._refs[block]

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block nobody holds goes back to the pool (keeping
        its K/V for a later match if it holds a registered prefix)."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    # ---- prefix caching -----------------------------------------------------------------------

    def register(self, block: int, block_hash: int) -> None:
        """`block` (held, full, computed) holds the prefix `block_hash` names. A prefix already
        registered keeps its first block; this one stays an ordinary block."""
        if block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def lookup(self, block_hash: int) -> int | None:
        return self._by_hash.get(block_hash)

    def take(self, block: int) -> None:
        """One more holder of a registered block (out of the cached pool if nobody held it)."""
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.prefix_hit_tokens = 0  # tokens whose computation a prefix match saved, since start
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
        # last block first: the least recently used cached block is then a prefix's end, evicted
        # before the blocks every longer match needs
        self.pool.free(seq.block_ids[::-1])
        self.pool.free(seq.cross_block_ids)
        seq.block_ids, seq.cross_block_ids = [], []
        seq.encoded = False
        seq.num_registered_blocks = 0

    # ---- prefix caching -----------------------------------------------------------------------

    def _block_hashes(self, seq: Sequence, n: int) -> list[int]:
        """The chained hashes of seq's first `n` full blocks (kept on the sequence: its tokens
        never change once written)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < n:
            i = len(hashes)
            prev = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash((prev, tuple(seq.token_ids[i * bs:(i + 1) * bs]))))
        return hashes[:n]

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the registered blocks of its longest cached
        prefix (whole blocks, always leaving its last token to compute) and mark their tokens
        computed. Returns the tokens matched."""
        if (not self.prefix_caching or seq.block_ids or seq.num_computed_tokens or seq.encoder_ids is not None
                or (seq.sampling.prompt_logprobs and seq.num_prompt_logprobs < seq.num_prompt_tokens)):
            return 0  # an encoder-decoder's K/V depend on its encoder; prompt logprobs need the prompt run
        blocks = []
        for h in self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self.pool.take(block)
        seq.block_ids = blocks
        seq.num_registered_blocks = len(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        self.prefix_hit_tokens += seq.num_computed_tokens
        return seq.num_computed_tokens

    def unmatch(self, seq: Sequence) -> None:
        """Undo `match_prefix` for a sequence that is not admitted after all."""
        self.prefix_hit_tokens -= seq.num_computed_tokens
        self.free(seq)
        seq.num_computed_tokens = 0

    def register_computed(self, seq: Sequence) -> None:
        """Register the blocks seq has filled and computed since the last call."""
        if not self.prefix_caching or seq.encoder_ids is not None:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if full <= seq.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            self.pool.register(seq.block_ids[i], hashes[i])
        seq.num_registered_blocks = full
