"""Triton paged attention: prefill, chunked prefill, decode and verification of a mixed batch in one launch,
plus a split-KV ("flash decoding") path for decode-only steps. Test oracle: ops.attention.paged_attention."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
TILE_N = 32  # keys per inner step, gathered through block_table one key at a time, so any power-of-2 block_size works
# Decode split-KV: enough programs to cover an H100's 132 SMs about twice, but no split shorter than
# MIN_SPLIT_TOKENS keys (a shorter one costs more in its partial write and the reduce than it saves).
TARGET_PROGRAMS = 264
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64
NO_WINDOW = 1 << 30  # a window longer than any context: one code path with or without sliding_window


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bfloat16's raw bits (it holds them as uint16); exact in float32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # ieee: exact float32 products for float32 models (TF32 misses the reference by ~1e-3); 16-bit is exact anyway
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_max_ptr, part_sum_ptr, part_acc_ptr,  # float32 scratch, used only when NUM_SPLITS > 1
    query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    scale_log2, sliding_window, num_heads,
    stride_q_token, stride_q_head, stride_out_token, stride_out_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_block_table,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One program: BLOCK_Q query tokens x the GROUP query heads of one KV head (its BLOCK_M rows), over one
    sequence's visible keys, or over 1/NUM_SPLITS of them (decode), writing a float32 partial softmax."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    # The grid is sized by the longest query, so short sequences' extra tiles (and CUDA-graph padding
    # sequences, q_len 0 or seq_len 0) stop here, before any load.
    if (q_tile * BLOCK_Q >= q_len) | (seq_len <= 0):
        return

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP  # [BLOCK_M] query token within the sequence's new tokens
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M]
    # BLOCK_M need not be a multiple of GROUP: the leftover rows would repeat the next tile's first token.
    row_valid = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = seq_len - q_len + q_idx  # [BLOCK_M] position in the context
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM  # head_dim 80 etc. is padded to the next power of 2
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]

    # Keys visible to some row of this tile: up to its last query (causal), from its first query's window.
    first_pos = seq_len - q_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    tile_lo = tl.maximum(first_pos - sliding_window + 1, 0) // TILE_N
    tile_hi = tl.cdiv(kv_end, TILE_N)
    if NUM_SPLITS > 1:  # even shares of this sequence's tiles; a short sequence leaves some splits empty
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_hi, tile_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    offs_n = tl.arange(0, TILE_N)
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_block_table
    for tile in range(tile_lo, tile_hi):
        kv_pos = tile * TILE_N + offs_n  # [TILE_N]
        kv_valid = kv_pos < seq_len
        block_ids = tl.load(block_table_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0)  # [TILE_N]
        # int64: block_id * stride overflows int32 in a cache of a few GiB
        slots = (block_ids.to(tl.int64) * stride_cache_block + (kv_pos % BLOCK_SIZE) * stride_cache_slot
                 + kv_head * stride_cache_head)  # [TILE_N]
        # Masked to 0 past seq_len: never-written cache memory may hold NaN, and 0 * NaN poisons P @ V.
        k = tl.load(k_cache_ptr + slots[None, :] + dims[:, None],
                    mask=kv_valid[None, :] & dim_valid[:, None], other=0.0)  # [HEAD_DIM_PAD, TILE_N]
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :],
                    mask=kv_valid[:, None] & dim_valid[None, :], other=0.0)  # [TILE_N, HEAD_DIM_PAD]
        s = _dot(q, k, UPCAST_DOT) * scale_log2  # [BLOCK_M, TILE_N]
        visible = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; subtracting 0 instead avoids -inf - -inf = NaN.
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, TILE_N]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT)
        m_i = m_new

    if NUM_SPLITS == 1:
        # Every valid row saw at least its own key; the others may have l_i = 0 and are not stored.
        out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    else:  # decode: one token per sequence, so the scratch is indexed by sequence
        part = (seq * num_heads + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _reduce_splits_kernel(
    out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, query_start_loc_ptr, seq_lens_ptr,
    num_heads, stride_out_token, stride_out_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """Combines one (sequence, head)'s NUM_SPLITS partial softmaxes into its decode output row."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if (q_len <= 0) | (tl.load(seq_lens_ptr + seq) <= 0):  # padding: the split kernel wrote no partials
        return
    part = (seq * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)  # [NUM_SPLITS]
    dims = tl.arange(0, HEAD_DIM_PAD)
    m = tl.load(part_max_ptr + part)  # [NUM_SPLITS]
    l = tl.load(part_sum_ptr + part)  # [NUM_SPLITS]
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :])  # [NUM_SPLITS, HEAD_DIM_PAD]
    # Splits with no keys hold m = -inf and weigh 0; the split with the query's own key is finite.
    weight = tl.exp2(m - tl.max(m, 0))  # [NUM_SPLITS]
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)  # [HEAD_DIM_PAD]
    tl.store(out_ptr + q_start.to(tl.int64) * stride_out_token + head * stride_out_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


_INTERPRETED = not isinstance(_attention_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


def _num_decode_splits(num_seqs: int, num_kv_heads: int, max_context: int) -> int:
    """A power of 2 (the reduce's tl.arange needs one) from host-known sizes only: no device sync."""
    wanted = min(triton.cdiv(max_context, MIN_SPLIT_TOKENS), triton.cdiv(TARGET_PROGRAMS, num_seqs * num_kv_heads),
                 MAX_SPLITS)
    return 1 << (max(wanted, 1).bit_length() - 1)


def unified_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place and returned
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's new tokens
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32, rows padded with any valid block id
    max_query_len: int,  # host int, the largest q_len: sizes the grid without a device sync
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # out
    """paged_attention's result for every sequence's new tokens, written into `out`; in one launch (two for a
    decode-only step split over the context). A sequence with q_len 0 or seq_len 0 leaves its rows untouched."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0 and q.dtype == k_cache.dtype == v_cache.dtype
    assert k_cache.stride() == v_cache.stride() and q.stride(2) == out.stride(2) == k_cache.stride(3) == 1
    if num_seqs == 0 or max_query_len <= 0:
        return out
    group = num_heads // num_kv_heads
    # 16 rows suit decode and verification; prefill tiles take 64 so each K/V tile serves more queries.
    block_m = max(16 if max_query_len * group <= 16 else 64, triton.next_power_of_2(group))
    head_dim_pad = triton.next_power_of_2(head_dim)
    num_splits = 1
    if max_query_len == 1:
        num_splits = _num_decode_splits(num_seqs, num_kv_heads, block_table.shape[1] * block_size)
    scratch = (out, out, out)  # unused pointers when there is one split
    if num_splits > 1:
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        scratch = (part_max, part_sum, part_acc)
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, block_m // group) * num_splits)
    _attention_kernel[grid](
        q, k_cache, v_cache, out, *scratch, query_start_loc, seq_lens, block_table,
        scale * LOG2E, sliding_window or NO_WINDOW, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        GROUP=group, BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, TILE_N=TILE_N, NUM_SPLITS=num_splits,
        UPCAST_DOT=q.dtype == torch.bfloat16 and _INTERPRETED,
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            out, *scratch, query_start_loc, seq_lens, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
        )
    return out
