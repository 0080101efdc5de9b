"""Paged attention layer and the per-step metadata that describes the flattened, ragged batch: as host lists
for the torch reference path (CPU), or as device tensors for the one-launch Triton kernel (GPU path)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ember.ops import cpu_kernels
from ember.ops.attention import decode_attn_bias, paged_attention, paged_decode_attention, write_kv


@dataclass
class AttentionMetadata:
    """Per-step description of the flattened, ragged batch, built by the runner. Explicit argument, never a global.

    A sequence's new tokens are the last q_len positions of its context (positions seq_len - q_len ... seq_len - 1),
    which covers prefill, chunked prefill, prefill after a prefix-cache hit, decode and speculative verification.
    Build a new one per step: each derived table is computed on first use (the torch path's and the C kernel's
    read different ones) and then shared by the layers.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot (block_id * block_size + offset) of each new token
    query_start_loc: list[int]  # [num_seqs + 1] offsets of each sequence's new tokens in the flattened batch
    seq_lens: list[int]  # [num_seqs] context length of each sequence, including this step's new tokens
    block_tables: list[list[int]]  # [num_seqs] each sequence's KV block ids, in order (covering seq_lens)

    def _long(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.slot_mapping.device)

    def _seqs_where(self, keep) -> list[int]:  # sequences whose number of new tokens satisfies keep(q_len)
        starts = self.query_start_loc
        return [i for i in range(self.num_seqs) if keep(starts[i + 1] - starts[i])]

    @cached_property
    def block_table_tensors(self) -> list[torch.Tensor]:  # block_tables on slot_mapping's device
        return [self._long(b) for b in self.block_tables]

    # Sequences with one new token (decodes), attended in one batched call by the torch path outside
    # batch-invariant mode.
    @cached_property
    def decode_seq_ids(self) -> list[int]:
        return self._seqs_where(lambda q_len: q_len == 1)

    @cached_property
    def other_seq_ids(self) -> list[int]:
        return self._seqs_where(lambda q_len: q_len != 1)

    @cached_property
    def decode_rows(self) -> torch.Tensor:  # [num_decodes] their rows in the flattened batch
        return self._long([self.query_start_loc[i] for i in self.decode_seq_ids])

    @cached_property
    def decode_block_table(self) -> torch.Tensor:  # [num_decodes, max_blocks], padded with 0
        rows = padded([self.block_tables[i] for i in self.decode_seq_ids])
        return self._long(rows).view(len(rows), len(rows[0]) if rows else 0)

    @cached_property
    def decode_seq_lens(self) -> torch.Tensor:  # [num_decodes]
        return self._long([self.seq_lens[i] for i in self.decode_seq_ids])

    def decode_attn_bias(self, block_size: int) -> torch.Tensor:
        """The decode rows' attention mask as an additive bias, built once per step and shared by the layers."""
        bias = getattr(self, "_decode_attn_bias", None)
        if bias is None:
            max_len = self.decode_block_table.shape[1] * block_size
            bias = self._decode_attn_bias = decode_attn_bias(self.decode_seq_lens, max_len)
        return bias

    def c_kernel_tables(self) -> "CKernelTables":
        """The step as the C attention kernel reads it (host tensors), built once per step and shared by the layers."""
        tables = getattr(self, "_c_kernel_tables", None)
        if tables is None:
            limit = cpu_kernels.ATTENTION_MAX_QUERY
            tables = self._c_kernel_tables = CKernelTables(
                short_seq_ids=torch.tensor(self._seqs_where(lambda q_len: q_len <= limit), dtype=torch.long),
                long_seq_ids=torch.tensor(self._seqs_where(lambda q_len: q_len > limit), dtype=torch.long),
                query_start_loc=torch.tensor(self.query_start_loc, dtype=torch.long),
                seq_lens=torch.tensor(self.seq_lens, dtype=torch.long),
                block_table=torch.tensor(padded(self.block_tables), dtype=torch.long),
            )
        return tables

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


@dataclass
class CKernelTables:
    short_seq_ids: torch.Tensor  # [n] int64: sequences with few new tokens (decode, verification): the C kernel's
    long_seq_ids: torch.Tensor  # [n] int64: the others (prefill chunks): the tiled C kernel
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64
    seq_lens: torch.Tensor  # [num_seqs] int64
    block_table: torch.Tensor  # [num_seqs, max_blocks] int64, rows padded with 0


@dataclass
class PackedAttentionMetadata:
    """The same batch as device tensors, for a kernel that attends every sequence in one launch (Triton).
    Building it needs no device-to-host sync, and a CUDA graph replays with these tensors refilled in place.
    Padding sequences (CUDA-graph buckets) have seq_len 0 and their tokens' slots point at a scratch block."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32, rows padded with 0
    max_query_len: int  # host int: sizes the kernel's grid

    @staticmethod
    def build(slots: list[int], query_start_loc: list[int], seq_lens: list[int], block_tables: list[list[int]],
              device: torch.device) -> "PackedAttentionMetadata":
        return PackedAttentionMetadata(
            slot_mapping=to_device(slots, torch.long, device),
            query_start_loc=to_device(query_start_loc, torch.int32, device),
            seq_lens=to_device(seq_lens, torch.int32, device),
            block_table=to_device(padded(block_tables), torch.int32, device),
            max_query_len=max(b - a for a, b in zip(query_start_loc, query_start_loc[1:])),
        )


def padded(block_tables: list[list[int]]) -> list[list[int]]:
    """Rows padded with block 0 (a valid id, never read for a position past seq_len) to the longest."""
    width = max((len(b) for b in block_tables), default=0)
    return [b + [0] * (width - len(b)) for b in block_tables]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`; through pinned memory and a non-blocking copy on a GPU, so the host
    never waits for the device here."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends every new query over its context."""

    use_triton = False  # the GPU path's kernel, with PackedAttentionMetadata (set by the runner)
    use_c_kernels = False  # the CPU path's C kernels, ember/ops/csrc (set by the runner)

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
        attn_metadata: AttentionMetadata | PackedAttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        write_kv(k, v, kv_cache[0], kv_cache[1], attn_metadata.slot_mapping)
        if self.use_triton:
            from ember.ops.triton_attention import unified_attention

            m = attn_metadata
            return unified_attention(q, kv_cache[0], kv_cache[1], torch.empty_like(q), m.query_start_loc, m.seq_lens,
                                     m.block_table, m.max_query_len, self.scale, self.sliding_window)
        if self.use_c_kernels and not self.batch_invariant and q.stride(1) == q.shape[2]:
            return self._forward_c_kernel(q, kv_cache, attn_metadata)
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

    def _forward_c_kernel(self, q: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Short queries and prefill chunks each through their C kernel, over the blocks in place."""
        tables = attn_metadata.c_kernel_tables()
        out = torch.empty(q.shape, dtype=q.dtype)
        for seq_ids, long_queries in ((tables.short_seq_ids, False), (tables.long_seq_ids, True)):
            if seq_ids.numel():
                cpu_kernels.paged_attention(q, kv_cache[0], kv_cache[1], seq_ids, tables.query_start_loc,
                                            tables.seq_lens, tables.block_table, self.scale, self.sliding_window,
                                            out, long_queries)
        return out
