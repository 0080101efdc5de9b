"""The per-step description of the flattened, ragged batch that attention backends read: host lists for the
reference and C-kernel backends (`AttentionMetadata`), device tensors for the one-launch Triton kernel
(`PackedAttentionMetadata`). Built by the backend's `build_metadata`, once per step; an explicit argument."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ember.ops.attention import decode_attn_bias
from ember.ops.cpu_kernels import ATTENTION_MAX_QUERY


@dataclass
class AttentionMetadata:
    """A sequence's new tokens are the last q_len positions of its context (positions seq_len - q_len ... seq_len - 1),
    which covers prefill, chunked prefill, prefill after a prefix-cache hit, decode and speculative verification.
    Each derived table is computed on first use (the torch path's and the C kernels' read different ones) and then
    shared by the layers.
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

    # Sequences with one new token (decodes), attended in one batched call by the reference backend outside
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

    @cached_property
    def c_kernel_tables(self) -> CKernelTables:
        """The step as the C attention kernels read it (host tensors), shared by the layers."""
        return CKernelTables(
            short_seq_ids=torch.tensor(self._seqs_where(lambda q_len: q_len <= ATTENTION_MAX_QUERY), dtype=torch.long),
            long_seq_ids=torch.tensor(self._seqs_where(lambda q_len: q_len > ATTENTION_MAX_QUERY), dtype=torch.long),
            query_start_loc=torch.tensor(self.query_start_loc, dtype=torch.long),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.long),
            block_table=torch.tensor(padded(self.block_tables), dtype=torch.long),
        )

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
              device: torch.device) -> PackedAttentionMetadata:
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
