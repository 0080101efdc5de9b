"""Paged attention layer and the per-step metadata that describes the flattened, ragged batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ember.ops.attention import decode_attn_bias, paged_attention, paged_decode_attention, write_kv


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
    # Sequences with one new token (decodes), attended in one batched call outside batch-invariant mode.
    decode_seq_ids: list[int] = field(init=False, repr=False)
    other_seq_ids: list[int] = field(init=False, repr=False)
    decode_rows: torch.Tensor = field(init=False, repr=False)  # [num_decodes] their rows in the flattened batch
    decode_block_table: torch.Tensor = field(init=False, repr=False)  # [num_decodes, max_blocks], padded with 0
    decode_seq_lens: torch.Tensor = field(init=False, repr=False)  # [num_decodes]
    _decode_attn_bias: torch.Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        device = self.slot_mapping.device
        self.block_table_tensors = [torch.tensor(b, dtype=torch.long, device=device) for b in self.block_tables]
        starts = self.query_start_loc
        self.decode_seq_ids = [i for i in range(self.num_seqs) if starts[i + 1] - starts[i] == 1]
        self.other_seq_ids = [i for i in range(self.num_seqs) if starts[i + 1] - starts[i] != 1]
        self.decode_rows = torch.tensor([starts[i] for i in self.decode_seq_ids], dtype=torch.long, device=device)
        max_blocks = max((len(self.block_tables[i]) for i in self.decode_seq_ids), default=0)
        self.decode_block_table = torch.tensor(
            [self.block_tables[i] + [0] * (max_blocks - len(self.block_tables[i])) for i in self.decode_seq_ids],
            dtype=torch.long, device=device,
        ).view(len(self.decode_seq_ids), max_blocks)
        self.decode_seq_lens = torch.tensor([self.seq_lens[i] for i in self.decode_seq_ids], dtype=torch.long, device=device)

    def decode_attn_bias(self, block_size: int) -> torch.Tensor:
        """The decode rows' attention mask as an additive bias, built once per step and shared by the layers."""
        if self._decode_attn_bias is None:
            max_len = self.decode_block_table.shape[1] * block_size
            self._decode_attn_bias = decode_attn_bias(self.decode_seq_lens, max_len)
        return self._decode_attn_bias

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends every new query over its context."""

    def __init__(self, scale: float, sliding_window: int | None, batch_invariant: bool = False):
        super().__init__()
        self.scale = scale
        self.sliding_window = sliding_window
        # Batched decode attention pads every context to the longest, which changes float summation
        # order slightly; batch-invariant mode attends each sequence alone instead.
        self.batch_invariant = batch_invariant

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        write_kv(k, v, kv_cache[0], kv_cache[1], attn_metadata.slot_mapping)
        if self.batch_invariant or not attn_metadata.decode_seq_ids:
            return paged_attention(q, kv_cache[0], kv_cache[1], attn_metadata, self.scale, self.sliding_window)
        bias = attn_metadata.decode_attn_bias(kv_cache.shape[2])
        if not attn_metadata.other_seq_ids:  # decodes only: the rows are the sequences, in order
            return paged_decode_attention(q, kv_cache[0], kv_cache[1], attn_metadata.decode_block_table,
                                          attn_metadata.decode_seq_lens, self.scale, self.sliding_window, bias)
        out = paged_attention(q, kv_cache[0], kv_cache[1], attn_metadata, self.scale, self.sliding_window,
                              seq_ids=attn_metadata.other_seq_ids)
        rows = attn_metadata.decode_rows
        out[rows] = paged_decode_attention(q[rows], kv_cache[0], kv_cache[1], attn_metadata.decode_block_table,
                                           attn_metadata.decode_seq_lens, self.scale, self.sliding_window, bias)
        return out
