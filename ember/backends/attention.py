"""Attention backends: how an attention layer writes this step's K/V into its paged cache and attends every new
query over its context. Reference (torch ops, the oracle), C kernels (CPU), Triton (GPU); each builds its metadata."""
from __future__ import annotations

import torch

from ember.backends.attention_metadata import AttentionMetadata, PackedAttentionMetadata, to_device
from ember.ops.attention import paged_attention, paged_decode_attention, write_kv
from ember.ops.cpu_kernels import KernelLibrary


class ReferenceAttention:
    """Torch ops. Outside batch-invariant mode, the decodes of a step are attended in one batched call; that pads
    every context to the longest, which changes float summation order slightly, so batch-invariant mode attends
    each sequence alone."""

    name = "reference"

    def __init__(self, batch_invariant: bool = False):
        self.batch_invariant = batch_invariant

    def build_metadata(self, slots: list[int], query_start_loc: list[int], seq_lens: list[int],
                       block_tables: list[list[int]], device: torch.device) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=to_device(slots, torch.long, device), query_start_loc=query_start_loc,
                                 seq_lens=seq_lens, block_tables=block_tables)

    def forward(self, layer, q, k, v, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        write_kv(k, v, kv_cache[0], kv_cache[1], metadata.slot_mapping)
        return self._attend(layer, q, kv_cache, metadata)

    def _attend(self, layer, q, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        if self.batch_invariant or not metadata.decode_seq_ids:
            return paged_attention(q, kv_cache[0], kv_cache[1], metadata, layer.scale, layer.sliding_window)
        bias = metadata.decode_attn_bias(kv_cache.shape[2])
        if not metadata.other_seq_ids:  # decodes only: the rows are the sequences, in order
            return paged_decode_attention(q, kv_cache[0], kv_cache[1], metadata.decode_block_table,
                                          metadata.decode_seq_lens, layer.scale, layer.sliding_window, bias)
        out = paged_attention(q, kv_cache[0], kv_cache[1], metadata, layer.scale, layer.sliding_window,
                              seq_ids=metadata.other_seq_ids)
        rows = metadata.decode_rows
        out[rows] = paged_decode_attention(q[rows], kv_cache[0], kv_cache[1], metadata.decode_block_table,
                                           metadata.decode_seq_lens, layer.scale, layer.sliding_window, bias)
        return out


class CKernelAttention(ReferenceAttention):
    """Short queries (decode, verification) and prefill chunks each through their C kernel, over the blocks in
    place. (A q whose heads are not contiguous, which no model here makes, takes the reference ops.)"""

    name = "c_kernels"

    def __init__(self, kernels: KernelLibrary):
        super().__init__()
        self.kernels = kernels

    def _attend(self, layer, q, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        if q.stride(1) != q.shape[2] or q.stride(2) != 1:
            return super()._attend(layer, q, kv_cache, metadata)
        tables = metadata.c_kernel_tables
        out = torch.empty(q.shape, dtype=q.dtype)
        for seq_ids, long_queries in ((tables.short_seq_ids, False), (tables.long_seq_ids, True)):
            if seq_ids.numel():
                self.kernels.paged_attention(q, kv_cache[0], kv_cache[1], seq_ids, tables.query_start_loc,
                                             tables.seq_lens, tables.block_table, layer.scale, layer.sliding_window,
                                             out, long_queries)
        return out


class TritonAttention:
    """The GPU path: one launch for every sequence of the step (ember/ops/triton_attention.py)."""

    name = "triton"

    def build_metadata(self, slots, query_start_loc, seq_lens, block_tables, device) -> PackedAttentionMetadata:
        return PackedAttentionMetadata.build(slots, query_start_loc, seq_lens, block_tables, device)

    def forward(self, layer, q, k, v, kv_cache, metadata: PackedAttentionMetadata) -> torch.Tensor:
        from ember.ops.triton_attention import unified_attention

        write_kv(k, v, kv_cache[0], kv_cache[1], metadata.slot_mapping)
        return unified_attention(q, kv_cache[0], kv_cache[1], torch.empty_like(q), metadata.query_start_loc,
                                 metadata.seq_lens, metadata.block_table, metadata.max_query_len, layer.scale,
                                 layer.sliding_window)
