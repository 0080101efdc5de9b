"""The KV block pool: allocation, ref counts, and the prefix cache of chained block hashes. No torch.

A full block's hash covers its tokens and its parent's hash, so matching a prompt against the cache is
a dictionary walk. Freed blocks keep their hash and stay matchable until they are evicted, least
recently freed first. Blocks never used yet are handed out only when no freed block is left: the pool's
memory is mapped lazily (runner/memory.py), so the prefix cache lives in memory the process already
touched and never grows it on its own.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ember.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The chained hash of one full block: equal hashes mean equal token prefixes up to this block."""
    return hash((parent_hash, token_ids))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_lookahead_slots: int = 0):
        """`num_lookahead_slots`: tokens past each step's own whose blocks a request is given when the pool has
        them to spare (the GPU runner decodes the next token before it is scheduled: ModelRunner.execute)."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_lookahead_slots = num_lookahead_slots
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Used blocks with ref_count 0, in eviction order (front = evicted first). Cached ones stay matchable.
        self.free_queue: OrderedDict[int, None] = OrderedDict()
        self.num_used_ever = 0  # blocks 0 .. num_used_ever - 1 have been handed out; the rest never were
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.req_block_ids: dict[str, list[int]] = {}
        self.req_block_hashes: dict[str, list[int]] = {}  # hashes of the request's full blocks so far
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # prompt tokens found

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue) + self.num_blocks - self.num_used_ever

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_block_ids.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request's tokens, as (block ids, number of tokens).

        At least one token is always left to compute: the step that computes it yields the logits
        the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._full_block_hashes(request, max_hit_blocks)
        block_ids = []
        for block_hash in hashes:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counts one scheduled lookup (for the prefix-cache hit-rate metrics)."""
        self.num_prefix_queries += num_tokens
        self.num_prefix_hits += num_hit_tokens

    def _full_block_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        hashes = self.req_block_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tuple(tokens[i * self.block_size : (i + 1) * self.block_size])))
        return hashes[:num_full_blocks]

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, computed_block_ids: list[int] = ()) -> bool:
        """Gives the request blocks for its computed tokens plus `num_new_tokens` more.

        `computed_block_ids` (from get_computed_blocks, first scheduling only) are shared, not copied.
        Returns False and changes nothing when the pool cannot supply the new blocks.
        """
        held = self.req_block_ids.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_block_ids) * self.block_size
        num_held = len(held) + len(computed_block_ids)
        num_needed = self.num_blocks_for(num_computed + num_new_tokens) - num_held
        # Cache hits sitting in the free queue are taken out of it, so they cannot also serve as new blocks.
        num_hits_free = sum(1 for b in computed_block_ids if self.blocks[b].ref_count == 0)
        num_available = self.num_free_blocks - num_hits_free
        if num_needed > num_available:
            return False
        # The next token's block too when the pool has it to spare (never at the cost of a preemption).
        num_needed_ahead = self.num_blocks_for(num_computed + num_new_tokens + self.num_lookahead_slots) - num_held
        if num_needed_ahead <= num_available:
            num_needed = max(num_needed, num_needed_ahead)
        for block_id in computed_block_ids:
            self._touch(block_id)
        held.extend(computed_block_ids)
        for _ in range(max(0, num_needed)):
            held.append(self._pop_free_block())
        if self.enable_prefix_caching:
            # Only blocks of the request's own tokens: proposed (speculative) ones may yet be rejected.
            num_full = min(num_computed + num_new_tokens, request.num_tokens) // self.block_size
            self._cache_full_blocks(request, held, num_full)
        return True

    def trim(self, request: Request, num_tokens: int) -> None:
        """Releases the request's blocks past its first `num_tokens` tokens (rejected proposals' blocks)."""
        held = self.req_block_ids.get(request.request_id, [])
        while len(held) > self.num_blocks_for(num_tokens):
            self._release(held.pop())

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free_block(self) -> int:
        if not self.free_queue:
            self.num_used_ever += 1
            self.blocks[self.num_used_ever - 1].ref_count = 1
            return self.num_used_ever - 1
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _cache_full_blocks(self, request: Request, held: list[int], num_full_blocks: int) -> None:
        # Blocks filled by this step are registered now: K/V writes happen before attention reads
        # within each layer, so a request matching them in the same step reads computed values.
        hashes = self._full_block_hashes(request, num_full_blocks)
        for block_id, block_hash in zip(held[:num_full_blocks], hashes):
            block = self.blocks[block_id]
            if block.block_hash is None:
                block.block_hash = block_hash
                self.cached.setdefault(block_hash, block_id)

    def free(self, request: Request, keep_cached: bool = True) -> None:
        """Releases the request's blocks; tail blocks go to the front of the eviction order. With
        `keep_cached=False` the blocks only this request held leave the prefix cache."""
        self.req_block_hashes.pop(request.request_id, None)
        for block_id in reversed(self.req_block_ids.pop(request.request_id, [])):
            block = self.blocks[block_id]
            if not keep_cached and block.ref_count == 1 and block.block_hash is not None:
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                block.block_hash = None
            self._release(block_id)

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:  # nothing to reuse: evict it first
                self.free_queue.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        for block_id in self.free_queue:
            self.blocks[block_id].block_hash = None
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].ref_count > 0}

    def check_integrity(self) -> None:
        """Asserts the pool's invariants (tests call it after every step)."""
        refs = [0] * self.num_blocks
        for block_ids in self.req_block_ids.values():
            for block_id in block_ids:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])
            is_free = block.block_id in self.free_queue or block.block_id >= self.num_used_ever
            assert (block.ref_count == 0) == is_free, block
        for block_hash, block_id in self.cached.items():
            assert self.blocks[block_id].block_hash == block_hash
