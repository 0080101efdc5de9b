"""Reference paged attention: write new K/V into the block cache, then attend each sequence over its blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, block_id * block_size + offset
) -> None:
    """Stores each new token's K/V at its flat cache slot (in place)."""
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache[block_ids] ([*block_ids.shape, block_size, num_kv_heads, head_dim]) through index_select, which
    copies whole blocks; advanced indexing copies element by element (~4x slower here)."""
    return cache.index_select(0, block_ids.flatten()).view(*block_ids.shape, *cache.shape[1:])


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    attn_metadata,  # ember.backends.attention_metadata.AttentionMetadata (not imported: ops sit below backends)
    scale: float,
    sliding_window: int | None = None,
    seq_ids: list[int] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole cached context.

    A sequence's new tokens are the last q_len of its seq_len positions, so query i sits at position
    seq_len - q_len + i. With a sliding window, a query sees keys at positions p with p > pos - window.
    Each sequence is computed on its own, so its result does not depend on the rest of the batch.
    With `seq_ids`, only those sequences' rows are computed; the other rows of the result are undefined.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    for i in range(len(attn_metadata.seq_lens)) if seq_ids is None else seq_ids:
        seq_len = attn_metadata.seq_lens[i]
        start, end = attn_metadata.query_start_loc[i], attn_metadata.query_start_loc[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        block_ids = attn_metadata.block_table_tensors[i]  # [num_seq_blocks]
        # Softmax (and the matmuls around it) in float32 whatever the model dtype: this is the oracle.
        k = gather_blocks(k_cache, block_ids).flatten(0, 1)[:seq_len].float()  # [seq_len, num_kv_heads, head_dim]
        v = gather_blocks(v_cache, block_ids).flatten(0, 1)[:seq_len].float()  # [seq_len, num_kv_heads, head_dim]
        # enable_gqa: query head h reads kv head h // (num_heads // num_kv_heads), as HF's repeat_kv
        # 4-D with a batch of one: 3-D inputs take SDPA's slow math path on CPU (2.5-4x here)
        k = k.transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, seq_len, head_dim]
        v = v.transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, seq_len, head_dim]
        qs = q[start:end].transpose(0, 1).unsqueeze(0).float()  # [1, num_heads, q_len, head_dim]
        mask, is_causal = _causal_mask(q_len, seq_len, sliding_window, q.device)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=num_heads != num_kv_heads)
        out[start:end] = o[0].transpose(0, 1).to(q.dtype)  # [q_len, num_heads, head_dim]
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int64, padded with any valid block id
    seq_lens: torch.Tensor,  # [num_seqs] int64
    scale: float,
    sliding_window: int | None = None,
    attn_bias: torch.Tensor | None = None,  # [num_seqs, 1, 1, max_blocks * block_size]: decode_attn_bias(...), reused
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Decode attention for many sequences in one call: contexts padded to the longest and masked.

    Equal to paged_attention up to float summation order (the padding changes SDPA's blocking).
    The query heads that share a KV head go in as that head's queries (q_len = num_heads // num_kv_heads),
    which SDPA's CPU kernel runs ~2.5x faster than its grouped-query mode.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = gather_blocks(k_cache, block_table).flatten(1, 2).float()  # [num_seqs, max_len, num_kv_heads, head_dim]
    v = gather_blocks(v_cache, block_table).flatten(1, 2).float()  # [num_seqs, max_len, num_kv_heads, head_dim]
    if attn_bias is None or sliding_window is not None:
        attn_bias = decode_attn_bias(seq_lens, k.shape[1], sliding_window)
    k = k.transpose(1, 2)  # [num_seqs, num_kv_heads, max_len, head_dim]
    v = v.transpose(1, 2)  # [num_seqs, num_kv_heads, max_len, head_dim]
    # HF's repeat_kv: query head h reads KV head h // (num_heads // num_kv_heads)
    qg = q.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=attn_bias, scale=scale)
    return o.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def decode_attn_bias(
    seq_lens: torch.Tensor, max_len: int, sliding_window: int | None = None
) -> torch.Tensor:  # [num_seqs, 1, 1, max_len] float32: 0 where a decode query may attend, -inf elsewhere
    kv_pos = torch.arange(max_len, device=seq_lens.device)[None, :]  # [1, max_len]
    visible = kv_pos < seq_lens[:, None]  # [num_seqs, max_len]
    if sliding_window is not None:
        visible &= kv_pos >= seq_lens[:, None] - sliding_window
    bias = torch.zeros(visible.shape, device=seq_lens.device).masked_fill_(~visible, float("-inf"))
    return bias[:, None, None, :]


def _causal_mask(
    q_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(bool mask [q_len, seq_len] or None, is_causal) for queries at the last q_len positions."""
    is_windowed = sliding_window is not None and seq_len > sliding_window
    if not is_windowed and q_len == 1:
        return None, False  # decode sees the whole context
    if not is_windowed and q_len == seq_len:
        return None, True  # square: SDPA's top-left causal mask is the right one
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]  # [q_len, 1]
    kv_pos = torch.arange(seq_len, device=device)[None, :]  # [1, seq_len]
    mask = kv_pos <= q_pos  # [q_len, seq_len]
    if is_windowed:
        mask &= kv_pos > q_pos - sliding_window
    return mask, False
