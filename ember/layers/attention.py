"""The paged attention layer: its scale and window, and the attention backend (ember/backends) that writes this
step's K/V into the layer's cache and attends every new query over its context."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ember.backends.attention_metadata import AttentionMetadata, PackedAttentionMetadata


class Attention(nn.Module):
    def __init__(self, scale: float, sliding_window: int | None, backend):
        super().__init__()
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata | PackedAttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        return self.backend.forward(self, q, k, v, kv_cache, attn_metadata)
