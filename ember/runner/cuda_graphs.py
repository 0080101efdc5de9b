"""CUDA graphs of the model's forward for decode steps, one per batch-size bucket: a decode step of a small
model is a few hundred kernel launches, which a replayed graph issues at once. Other steps run eagerly."""
from __future__ import annotations

import bisect

import torch
from torch import nn

from ember.backends.attention_metadata import PackedAttentionMetadata

MAX_CAPTURED_SEQS = 512  # larger decode batches run eagerly (their launches are a small share of the step)


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 (as vLLM), up to and including max_num_seqs."""
    sizes = [s for s in [1, 2, 4, *range(8, MAX_CAPTURED_SEQS + 1, 8)] if s < max_num_seqs]
    return sizes + [min(max_num_seqs, MAX_CAPTURED_SEQS)]


class DecodeGraphs:
    """Captures `model` over static input buffers; `run` copies a step's inputs in, pads the batch to its
    bucket (padding rows: token 0, seq_len 0, K/V written to `pad_slot`) and replays."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], max_num_seqs: int, max_blocks_per_seq: int,
                 pad_slot: int):
        self.buckets = batch_size_buckets(max_num_seqs)
        self.max_num_seqs = size = self.buckets[-1]
        self.pad_slot = pad_slot
        device = kv_caches[0].device
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), pad_slot, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)  # one token per sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [size, hidden_size], rewritten by each replay
        pool = None
        with torch.inference_mode():
            for size in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
                metadata = PackedAttentionMetadata(self.slot_mapping[:size], self.query_start_loc[:size + 1],
                                                   self.seq_lens[:size], self.block_table[:size], max_query_len=1)
                args = (self.input_ids[:size], self.positions[:size], kv_caches, metadata)
                model(*args)  # Triton compiles (and picks) its kernels outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = model(*args)
                pool = graph.pool()
                self.graphs[size] = graph

    def run(self, input_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:  # [num_seqs, hidden_size]
        """`input_ids`: host values, or a device tensor (a lookahead step's tokens, sampled on the device)."""
        num_seqs = len(seq_lens)
        size = self.buckets[bisect.bisect_left(self.buckets, num_seqs)]
        num_pad = size - num_seqs
        if isinstance(input_ids, torch.Tensor):
            self.input_ids[:num_seqs].copy_(input_ids)
            self.input_ids[num_seqs:size].zero_()
        else:
            _copy_in(self.input_ids[:size], input_ids + [0] * num_pad)
        _copy_in(self.positions[:size], positions + [0] * num_pad)
        _copy_in(self.slot_mapping[:size], slots + [self.pad_slot] * num_pad)
        _copy_in(self.seq_lens[:size], seq_lens + [0] * num_pad)
        # Only the columns in use: the kernel reads no further than each row's seq_len.
        width = max(len(b) for b in block_tables)
        table = [b + [0] * (width - len(b)) for b in block_tables] + [[0] * width] * num_pad
        _copy_in(self.block_table[:size, :width], table)
        self.graphs[size].replay()
        return self.outputs[size][:num_seqs]


def _copy_in(target: torch.Tensor, values: list) -> None:
    """Host values into a device buffer through pinned memory, without making the host wait."""
    target.copy_(torch.tensor(values, dtype=target.dtype, pin_memory=True), non_blocking=True)
