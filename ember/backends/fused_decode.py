"""A pre-norm decoder layer (norm, fused QKV, optional per-head q/k norms, RoPE, attention, output projection,
norm, fused gate-up, SiLU-mul, down projection: the Llama family's block) as one C call (ops/csrc/decode_layer.c)
for decode-sized steps: the layer's own kernels in the same order, without the ~15 Python calls and tensor
allocations a layer otherwise costs per step. Part of the C-kernel backend: it serves a model when every
projection holds a C int4 copy and the step's queries are all short, and steps aside otherwise."""
from __future__ import annotations

import torch

from ember.backends.attention import CKernelAttention
from ember.backends.attention_metadata import AttentionMetadata
from ember.ops.cpu_kernels import KERNEL_COLUMN_GROUP, DecodeStep, DecoderLayer, KernelLibrary, Q4Linear
from ember.ops.linear import Int4Weight


class FusedDecode:
    def __init__(self, kernels: KernelLibrary):
        self.kernels = kernels

    def fuse(self, layers) -> FusedLayers | None:
        """The layers as decode_layer.c reads them, or None unless every one has the block's shape and weights."""
        fused = [self._fuse_layer(layer) for layer in layers]
        return FusedLayers(self.kernels, fused) if fused and all(f is not None for f in fused) else None

    def _fuse_layer(self, layer) -> DecoderLayer | None:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not isinstance(getattr(attn.attn, "backend", None), CKernelAttention):
            return None
        projections = [_q4(attn.qkv_proj), _q4(attn.o_proj), _q4(mlp.gate_up_proj), _q4(mlp.down_proj)]
        if any(p is None for p in projections):
            return None
        rope = attn.rotary_emb
        return DecoderLayer(
            hidden=layer.input_layernorm.weight.shape[0], num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, intermediate=mlp.down_proj.weight.shape[1], eps=layer.input_layernorm.eps,
            scale=attn.attn.scale, window=attn.attn.sliding_window or 0,
            input_norm=layer.input_layernorm.weight.data_ptr(),
            post_norm=layer.post_attention_layernorm.weight.data_ptr(),
            q_norm=None if attn.q_norm is None else attn.q_norm.weight.data_ptr(),
            k_norm=None if attn.k_norm is None else attn.k_norm.weight.data_ptr(),
            qkv=projections[0], o=projections[1], gate_up=projections[2], down=projections[3],
            cos_cache=rope.cos_cache.data_ptr(), sin_cache=rope.sin_cache.data_ptr())


def _q4(linear) -> Q4Linear | None:
    weight = getattr(linear, "quantized", None)
    if not isinstance(weight, Int4Weight) or not weight.use_kernel or weight.out_features % KERNEL_COLUMN_GROUP:
        return None  # (the C layer writes each projection's exact width: no padded columns)
    bias = linear.bias
    return Q4Linear(weight.qs.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(),
                    None if bias is None else bias.data_ptr(), weight.out_features, weight.in_features,
                    weight.int8_activations)


class FusedLayers:
    """A model's fused layers (pointers into the modules' tensors, which stay alive with the model)."""

    def __init__(self, kernels: KernelLibrary, layers: list[DecoderLayer]):
        self.kernels, self.layers = kernels, layers

    def forward(self, positions: torch.Tensor, attn_metadata, kv_caches: list[torch.Tensor],
                hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hidden, residual) after every layer, or None when the step does not qualify (a prefill chunk in it)."""
        if not isinstance(attn_metadata, AttentionMetadata) or positions.dtype != torch.long:
            return None
        tables = attn_metadata.c_kernel_tables
        if tables.long_seq_ids.numel():
            return None
        positions, slots = positions.contiguous(), attn_metadata.slot_mapping.contiguous()  # read as int64_t
        step = DecodeStep(
            num_tokens=hidden_states.shape[0], positions=positions.data_ptr(), slots=slots.data_ptr(),
            block_size=kv_caches[0].shape[2], kv_f16=int(kv_caches[0].dtype == torch.float16),
            seq_ids=tables.short_seq_ids.data_ptr(), query_start_loc=tables.query_start_loc.data_ptr(),
            seq_lens=tables.seq_lens.data_ptr(), block_table=tables.block_table.data_ptr(),
            num_seqs=tables.short_seq_ids.numel(), max_blocks=tables.block_table.shape[1])
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            step.k_cache, step.v_cache = kv_cache[0].data_ptr(), kv_cache[1].data_ptr()
            hidden_states, residual = self.kernels.decoder_layer(layer, step, hidden_states, residual)
        return hidden_states, residual
