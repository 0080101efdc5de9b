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


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    attn_metadata,  # ember.layers.attention.AttentionMetadata (not imported: ops sit below layers)
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
        k = k_cache[block_ids].flatten(0, 1)[:seq_len].float()  # [seq_len, num_kv_heads, head_dim]
        v = v_cache[block_ids].flatten(0, 1)[:seq_len].float()  # [seq_len, num_kv_heads, head_dim]
        # enable_gqa: query head h reads kv head h // (num_heads // num_kv_heads), as HF's repeat_kv
        k = k.transpose(0, 1)  # [num_kv_heads, seq_len, head_dim]
        v = v.transpose(0, 1)  # [num_kv_heads, seq_len, head_dim]
        qs = q[start:end].transpose(0, 1).float()  # [num_heads, q_len, head_dim]
        mask, is_causal = _causal_mask(q_len, seq_len, sliding_window, q.device)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=num_heads != num_kv_heads)
        out[start:end] = o.transpose(0, 1).to(q.dtype)  # [q_len, num_heads, head_dim]
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int64, padded with any valid block id
    seq_lens: torch.Tensor,  # [num_seqs] int64
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Decode attention for many sequences in one call: contexts padded to the longest and masked.

    Equal to paged_attention up to float summation order (the padding changes SDPA's blocking).
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = k_cache[block_table].flatten(1, 2).float()  # [num_seqs, max_len, num_kv_heads, head_dim]
    v = v_cache[block_table].flatten(1, 2).float()  # [num_seqs, max_len, num_kv_heads, head_dim]
    kv_pos = torch.arange(k.shape[1], device=q.device)[None, :]  # [1, max_len]
    mask = kv_pos < seq_lens[:, None]  # [num_seqs, max_len]
    if sliding_window is not None:
        mask &= kv_pos >= seq_lens[:, None] - sliding_window
    k = k.transpose(1, 2)  # [num_seqs, num_kv_heads, max_len, head_dim]
    v = v.transpose(1, 2)  # [num_seqs, num_kv_heads, max_len, head_dim]
    o = F.scaled_dot_product_attention(q.float().unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=num_heads != num_kv_heads)
    return o.squeeze(2).to(q.dtype)  # [num_seqs, num_heads, head_dim]


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
