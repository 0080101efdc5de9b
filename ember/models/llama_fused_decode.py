"""A Llama decoder layer as one C call (ember/ops/csrc/decode_layer.c) for decode-sized steps on the CPU:
the modules' own kernels in the same order, without the ~15 Python calls and tensor allocations a layer
otherwise costs per step (a small model's decode step is dominated by them). Used when every projection has
a C-kernel int4 copy and every sequence's query in the step is short (decode, speculative verification)."""
from __future__ import annotations

import torch

from ember.layers.attention import AttentionMetadata
from ember.ops import cpu_kernels
from ember.ops.linear import KERNEL_COLUMN_GROUP, Int4Weight


def _q4(linear) -> cpu_kernels.Q4Linear | None:
    weight = getattr(linear, "quantized", None)
    if not isinstance(weight, Int4Weight) or not weight.use_kernel or weight.out_features % KERNEL_COLUMN_GROUP:
        return None  # (the C layer writes each projection's exact width: no padded columns)
    bias = linear.bias
    return cpu_kernels.Q4Linear(weight.qs.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(),
                                None if bias is None else bias.data_ptr(), weight.out_features, weight.in_features,
                                weight.int8_activations)


def fuse_layer(layer) -> cpu_kernels.DecoderLayer | None:
    """The layer's parameters as decode_layer.c reads them (pointers into the module's tensors, which stay
    alive with it), or None if the layer does not qualify."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = [_q4(attn.qkv_proj), _q4(attn.o_proj), _q4(mlp.gate_up_proj), _q4(mlp.down_proj)]
    if any(p is None for p in projections) or not attn.attn.use_c_kernels or attn.attn.batch_invariant:
        return None
    rope = attn.rotary_emb
    return cpu_kernels.DecoderLayer(
        hidden=layer.input_layernorm.weight.shape[0], num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim, intermediate=mlp.down_proj.weight.shape[1], eps=layer.input_layernorm.eps,
        scale=attn.attn.scale, window=attn.attn.sliding_window or 0,
        input_norm=layer.input_layernorm.weight.data_ptr(), post_norm=layer.post_attention_layernorm.weight.data_ptr(),
        q_norm=None if attn.q_norm is None else attn.q_norm.weight.data_ptr(),
        k_norm=None if attn.k_norm is None else attn.k_norm.weight.data_ptr(),
        qkv=projections[0], o=projections[1], gate_up=projections[2], down=projections[3],
        cos_cache=rope.cos_cache.data_ptr(), sin_cache=rope.sin_cache.data_ptr())


def decode_step(positions: torch.Tensor, attn_metadata: AttentionMetadata, block_size: int,
                num_tokens: int) -> tuple[cpu_kernels.DecodeStep, list] | None:
    """The step for decode_layer.c (k_cache / v_cache filled per layer), and the tensors it points into;
    None when the step does not qualify (a prefill chunk among the sequences)."""
    if not isinstance(attn_metadata, AttentionMetadata):
        return None
    if positions.dtype != torch.long or attn_metadata.slot_mapping.dtype != torch.long:  # read as int64_t
        return None
    tables = attn_metadata.c_kernel_tables()
    if tables.long_seq_ids.numel():
        return None
    positions, slots = positions.contiguous(), attn_metadata.slot_mapping.contiguous()
    step = cpu_kernels.DecodeStep(
        num_tokens=num_tokens, positions=positions.data_ptr(), slots=slots.data_ptr(), block_size=block_size,
        seq_ids=tables.short_seq_ids.data_ptr(), query_start_loc=tables.query_start_loc.data_ptr(),
        seq_lens=tables.seq_lens.data_ptr(), block_table=tables.block_table.data_ptr(),
        num_seqs=tables.short_seq_ids.numel(), max_blocks=tables.block_table.shape[1])
    return step, [positions, slots]
