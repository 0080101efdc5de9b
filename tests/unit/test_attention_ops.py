"""Batched decode attention against the per-sequence reference, over a shuffled paged cache."""
import pytest
import torch

from ember.backends.attention_metadata import AttentionMetadata
from ember.ops.attention import paged_attention, paged_decode_attention


@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_equals_per_sequence(sliding_window, dtype):
    torch.manual_seed(0)
    num_blocks, block_size, num_heads, num_kv_heads, head_dim = 32, 4, 6, 2, 16
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    seq_lens = [1, 7, 13, 4]
    free = torch.randperm(num_blocks).tolist()
    block_tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    q = torch.randn(len(seq_lens), num_heads, head_dim).to(dtype)
    metadata = AttentionMetadata(slot_mapping=torch.zeros(len(seq_lens), dtype=torch.long),
                                 query_start_loc=list(range(len(seq_lens) + 1)), seq_lens=seq_lens, block_tables=block_tables)
    reference = paged_attention(q, k_cache, v_cache, metadata, scale=head_dim**-0.5, sliding_window=sliding_window)
    batched = paged_decode_attention(q, k_cache, v_cache, metadata.decode_block_table, metadata.decode_seq_lens,
                                     scale=head_dim**-0.5, sliding_window=sliding_window)
    # Same math, different float summation order: float32 agrees to 1e-5, bfloat16 to its rounding.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(batched.float(), reference.float(), atol=tolerance, rtol=tolerance)
    assert metadata.decode_seq_ids == [0, 1, 2, 3] and metadata.other_seq_ids == []


def test_metadata_splits_decodes_from_prefills():
    metadata = AttentionMetadata(slot_mapping=torch.zeros(6, dtype=torch.long), query_start_loc=[0, 1, 5, 6],
                                 seq_lens=[9, 4, 3], block_tables=[[3, 1, 2], [0], [5]])
    assert (metadata.decode_seq_ids, metadata.other_seq_ids) == ([0, 2], [1])
    assert metadata.decode_rows.tolist() == [0, 5]
    assert metadata.decode_block_table.tolist() == [[3, 1, 2], [5, 0, 0]]
