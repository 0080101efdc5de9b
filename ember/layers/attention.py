"""Paged attention layer and the per-step metadata that describes the flattened, ragged batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ember.ops.attention import paged_attention, write_kv


@dataclass
class AttentionMetadata:
    """Per-step description of the flattened, ragged batch, built by the runner. Explicit argument, never a global.

    A sequence's new tokens are the last q_len positions of its context (positions seq_len - q_len ... seq_len - 1),
    which covers prefill, chunked prefill, prefill after a prefix-cache hit, decode and speculative verification.
    Build a new one per step: the derived tensors are computed once, at construction.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot (block_id * block_size + offset) of each new token
    query_start_loc: list[int]  # [num_seqs + 1] offsets of each sequence's new tokens in the flattened batch
    seq_lens: list[int]  # [num_seqs] context length of each sequence, including this step's new tokens
    block_tables: list[list[int]]  # [num_seqs] each sequence's KV block ids, in order (covering seq_lens)
    block_table_tensors: list[torch.Tensor] = field(init=False, repr=False)  # block_tables on slot_mapping's device

    def __post_init__(self) -> None:
        device = self.slot_mapping.device
        self.block_table_tensors = [torch.tensor(b, dtype=torch.long, device=device) for b in self.block_tables]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends every new query over its context."""

    def __init__(self, scale: float, sliding_window: int | None):
        super().__init__()
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        write_kv(k, v, kv_cache[0], kv_cache[1], attn_metadata.slot_mapping)
        return paged_attention(q, kv_cache[0], kv_cache[1], attn_metadata, self.scale, self.sliding_window)
