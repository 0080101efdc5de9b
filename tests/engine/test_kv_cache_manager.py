"""KV block pool and prefix cache, with no model: exact block ids, ref counts and eviction order."""
import pytest

from ember.engine.kv_cache_manager import KVCacheManager, hash_block
from ember.engine.request import Request
from ember.sampling_params import SamplingParams


def make_request(request_id, token_ids):
    return Request(request_id, token_ids, SamplingParams(), max_tokens=16)


def allocate_prompt(kv, request):
    block_ids, num_cached = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, block_ids)
    request.num_computed_tokens = request.num_tokens
    return num_cached


def test_allocation_takes_blocks_in_order_and_free_returns_them():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(10)))  # 3 blocks
    assert allocate_prompt(kv, a) == 0
    assert kv.block_ids("a") == [0, 1, 2]
    assert [kv.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 0]
    assert kv.num_free_blocks == 5
    # Two full blocks are cached; the partial third is not.
    assert kv.blocks[0].block_hash == hash_block(None, (0, 1, 2, 3))
    assert kv.blocks[1].block_hash == hash_block(kv.blocks[0].block_hash, (4, 5, 6, 7))
    assert kv.blocks[2].block_hash is None
    kv.check_integrity()
    kv.free(a)
    assert kv.num_free_blocks == 8
    # The uncached partial block is evicted first, then the tail before the head.
    assert list(kv.free_queue)[:1] == [2]
    assert list(kv.free_queue)[-2:] == [1, 0]
    kv.check_integrity()


def test_decode_grows_blocks_one_at_a_time():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = make_request("a", [1, 2, 3])
    allocate_prompt(kv, a)
    assert kv.block_ids("a") == [0]
    a.append_output_token(4)  # fills block 0
    assert kv.allocate_slots(a, 1)
    a.num_computed_tokens += 1
    assert kv.block_ids("a") == [0]
    assert kv.blocks[0].block_hash == hash_block(None, (1, 2, 3, 4))
    a.append_output_token(5)  # needs a second block
    assert kv.allocate_slots(a, 1)
    assert kv.block_ids("a") == [0, 1]
    kv.check_integrity()


def test_prefix_hit_shares_blocks_and_counts_refs():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(10)))
    allocate_prompt(kv, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])  # shares two full blocks
    block_ids, num_cached = kv.get_computed_blocks(b)
    assert (block_ids, num_cached) == ([0, 1], 8)
    assert kv.allocate_slots(b, b.num_tokens - num_cached, block_ids)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    kv.check_integrity()
    kv.free(a)
    assert [kv.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    kv.check_integrity()


def test_full_hit_still_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(8)))
    allocate_prompt(kv, a)
    kv.free(a)
    again = make_request("again", list(range(8)))
    block_ids, num_cached = kv.get_computed_blocks(again)
    # 8 tokens = 2 full blocks, but the last token must be recomputed for its logits: 1 block hit.
    assert (block_ids, num_cached) == ([0], 4)


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])  # blocks 0,1 full+cached, block 2 partial
    allocate_prompt(kv, a)
    kv.free(a)
    # a's uncached partial block is evicted first, then a's tail block 1, then 0; block 3 was never used.
    assert list(kv.free_queue) == [2, 1, 0] and kv.num_free_blocks == 4
    b = make_request("b", [7, 7, 7])  # takes 2 blocks from those already used: 2 (uncached) and 1 (evicted)
    allocate_prompt(kv, b)
    assert kv.block_ids("b") == [2, 1]
    hit = make_request("hit", [1, 2, 3, 4, 6])
    assert kv.get_computed_blocks(hit) == ([0], 2)  # block 1 was evicted, block 0 still matches
    kv.free(b)
    # b's uncached partial block 1 goes first; then least recently freed: a's 0, then b's full block 2.
    assert list(kv.free_queue) == [1, 0, 2]
    c = make_request("c", [9, 9, 9, 9, 9, 9, 9])  # 4 blocks: every used one, then the never-used block 3
    allocate_prompt(kv, c)
    assert kv.block_ids("c") == [1, 0, 2, 3]
    assert kv.get_computed_blocks(hit) == ([], 0)
    kv.check_integrity()


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    a = make_request("a", list(range(12)))
    assert not kv.allocate_slots(a, 12)
    assert kv.block_ids("a") == []
    assert kv.num_free_blocks == 2
    kv.check_integrity()


def test_cache_hits_in_free_queue_are_not_double_counted_as_free():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    allocate_prompt(kv, a)
    kv.free(a)
    # b hits blocks 0 and 1 (both free) and needs 2 new blocks: only 1 other block exists.
    b = make_request("b", [1, 2, 3, 4, 8, 8, 8])
    block_ids, num_cached = kv.get_computed_blocks(b)
    assert block_ids == [0, 1]
    assert not kv.allocate_slots(b, b.num_tokens - num_cached, block_ids)
    kv.check_integrity()


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    allocate_prompt(kv, a)
    b = make_request("b", list(range(9)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert all(block.block_hash is None for block in kv.blocks)


def test_zero_blocks_is_an_error():
    with pytest.raises(ValueError, match="at least one block"):
        KVCacheManager(num_blocks=0, block_size=4)


def test_lookahead_slot_takes_the_next_block_only_when_spare():
    kv = KVCacheManager(num_blocks=4, block_size=4, num_lookahead_slots=1)
    a = make_request("a", list(range(8)))  # 2 full blocks; the next token (position 8) opens a third
    allocate_prompt(kv, a)
    assert len(kv.block_ids("a")) == 3
    assert kv.blocks[kv.block_ids("a")[2]].block_hash is None  # the block ahead holds no token yet: not cached
    b = make_request("b", list(range(100, 104)))  # one block, and one ahead that the pool no longer has
    allocate_prompt(kv, b)
    assert len(kv.block_ids("b")) == 1 and kv.num_free_blocks == 0
    kv.check_integrity()


def test_lookahead_slot_never_costs_an_allocation():
    kv = KVCacheManager(num_blocks=3, block_size=4, num_lookahead_slots=1)
    a = make_request("a", list(range(12)))  # exactly the pool: the block ahead is not there to take
    assert kv.allocate_slots(a, 12)
    assert len(kv.block_ids("a")) == 3 and kv.num_free_blocks == 0
    kv.check_integrity()


def test_failed_request_blocks_leave_the_prefix_cache_unless_shared():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(8)))  # 2 full blocks, both cached
    allocate_prompt(kv, a)
    b = make_request("b", list(range(4)) + [90, 91, 92, 93])  # shares block 0 with a
    assert allocate_prompt(kv, b) == 4
    assert kv.block_ids("b") == [0, 2]
    kv.free(b, keep_cached=False)  # b failed: its own block 2 is dropped, the shared block 0 stays cached
    assert kv.blocks[2].block_hash is None and kv.blocks[0].block_hash is not None
    assert kv.blocks[0].ref_count == 1 and kv.blocks[2].ref_count == 0
    assert list(kv.free_queue)[0] == 2  # nothing to reuse: evicted first
    kv.free(a)
    assert kv.get_computed_blocks(make_request("c", list(range(8)) + [5])) == ([0, 1], 8)
    kv.check_integrity()
