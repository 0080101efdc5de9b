"""Triton unified attention against the torch reference over a shuffled paged cache; the Triton interpreter on CPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit at import, so before the kernel module
triton = pytest.importorskip("triton")

from ember.backends.attention_metadata import AttentionMetadata  # noqa: E402
from ember.ops.attention import paged_attention  # noqa: E402
from ember.ops.triton_attention import _num_decode_splits, unified_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 differs from the reference only in summation order; 16-bit rounds the softmax weights to the
# model dtype before P @ V (as flash attention does), then both round the output.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
SENTINEL = 7.0


def check(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, sliding_window=None, block_size=16,
          max_blocks=None, num_padding_tokens=0):
    """Runs unified_attention on random K/V in shuffled blocks and compares every real sequence's rows with
    paged_attention. Sequences with q_len 0 or seq_len 0 are padding: their rows must keep SENTINEL."""
    torch.manual_seed(0)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    # [num_blocks, block_size, num_kv_heads, head_dim]
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    free = torch.randperm(num_blocks).tolist()
    block_tables = [[free.pop() for _ in range(n)] for n in blocks_per_seq]
    for blocks, seq_len in zip(block_tables, seq_lens):  # never-written slots may hold NaN: must not leak
        if seq_len % block_size:
            k_cache[blocks[-1], seq_len % block_size:] = float("nan")
            v_cache[blocks[-1], seq_len % block_size:] = float("nan")
    width = max_blocks or max(blocks_per_seq)
    query_start_loc = [0]
    for q_len in q_lens:
        query_start_loc.append(query_start_loc[-1] + q_len)
    num_tokens = query_start_loc[-1] + num_padding_tokens
    q = torch.randn(num_tokens, num_heads, head_dim).to(dtype)  # [num_tokens, num_heads, head_dim]
    real = [i for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)) if q_len and seq_len]
    metadata = AttentionMetadata(slot_mapping=torch.zeros(num_tokens, dtype=torch.long),
                                 query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables)
    reference = paged_attention(q, k_cache, v_cache, metadata, head_dim**-0.5, sliding_window, seq_ids=real)

    out = torch.full_like(q, SENTINEL, device=DEVICE)
    result = unified_attention(
        q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), out,
        torch.tensor(query_start_loc, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor([b + [0] * (width - len(b)) for b in block_tables], dtype=torch.int32, device=DEVICE),
        max(q_lens), head_dim**-0.5, sliding_window,
    )
    assert result is out
    is_real_row = torch.zeros(num_tokens, dtype=torch.bool)
    for i in real:
        is_real_row[query_start_loc[i]:query_start_loc[i + 1]] = True
    out = out.cpu()
    torch.testing.assert_close(out[is_real_row].float(), reference[is_real_row].float(),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert (out[~is_real_row] == SENTINEL).all()


# A fresh prefill longer than one query tile, a chunk continuing a cached 32-token prefix, two decodes,
# a 3-token verification.
MIXED_Q_LENS, MIXED_SEQ_LENS = [70, 13, 1, 1, 3], [70, 45, 33, 5, 27]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 2), (4, 4)])
def test_mixed_batch(num_heads, num_kv_heads, dtype):
    check(MIXED_Q_LENS, MIXED_SEQ_LENS, num_heads, num_kv_heads, 64, dtype)


@pytest.mark.parametrize("sliding_window, block_size", [(None, 8), (8, 64)])
def test_head_dim_80_sliding_window_block_sizes(sliding_window, block_size):
    # group 3: a tile's rows are not a multiple of it; block_size 8: four blocks per key tile, 64: half a block
    check(MIXED_Q_LENS, MIXED_SEQ_LENS, 6, 2, 80, torch.float32, sliding_window, block_size)


@pytest.mark.parametrize("sliding_window", [None, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_kv(sliding_window, dtype):
    # 32 blocks of 16 bound the context at 512 keys: 4 splits, the short sequence leaving some empty
    assert _num_decode_splits(num_seqs=3, num_kv_heads=2, max_context=32 * 16) == 4
    check([1, 1, 1], [450, 37, 129], 8, 2, 64, dtype, sliding_window, max_blocks=32)


@pytest.mark.parametrize("q_lens, seq_lens", [
    ([3, 0, 1, 1], [40, 0, 17, 0]),  # mixed step: q_len 0 and seq_len 0 padding sequences
    ([1, 1, 0], [300, 0, 0]),  # decode split path with padding sequences
])
def test_padding_rows_untouched(q_lens, seq_lens):
    check(q_lens, seq_lens, 4, 2, 64, torch.float32, max_blocks=32, num_padding_tokens=2)


def test_num_decode_splits():
    assert _num_decode_splits(num_seqs=1, num_kv_heads=8, max_context=32768) == 32
    assert _num_decode_splits(num_seqs=64, num_kv_heads=8, max_context=32768) == 1
    assert _num_decode_splits(num_seqs=1, num_kv_heads=8, max_context=100) == 1
