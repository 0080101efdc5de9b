"""Linear methods on Ember's C kernels (CPU, float32 activations): int4 weights (straight from a GGUF file's
Q4_0 / Q4_1 blocks, or quantized from floats), per-column int8 weights, and the LM head. The quantized copy
serves every batch size and replaces the float matrix (benchmarks/NOTES.md: at or above oneDNN's float32 GEMM
at every row count)."""
from __future__ import annotations

import torch
from torch import nn

from ember.backends.linear_dense import DenseMethod, drop_plain_weight, shard_of
from ember.int4_blocks import Int4Blocks
from ember.ops.cpu_kernels import KernelLibrary
from ember.ops.linear import INT4_GROUP_SIZE, Int4Weight, Int8Weight, Q8_0Weight
from ember.weight_copy import check_shape


class CInt4Method(DenseMethod):
    """w = d * q + m per group of 32 inputs. A GGUF shard that arrives as Int4Blocks is kept as it is (the float
    weight is never written); the kernel's copy is made after loading. `int8_activations`: x rounded to int8 per
    block of 32 inputs (qlinear_i8.c), where the library has those kernels. A width not a multiple of 32 stays dense."""

    name = "int4_c"

    def __init__(self, kernels: KernelLibrary, int8_activations: bool):
        super().__init__()
        self.kernels, self.int8_activations = kernels, int8_activations and kernels.int8_activations

    def create_weights(self, layer, input_size, output_size, bias, dtype) -> None:
        super().create_weights(layer, input_size, output_size, bias, dtype)
        layer.int4_blocks = {}  # by shard (0 for a whole weight), until process_weights_after_loading
        layer.quantized = None

    def weight_loader(self, layer, param, loaded, shard_id) -> None:
        if isinstance(loaded, Int4Blocks) and param is layer.weight:
            check_shape(shard_of(layer, param, shard_id), loaded)
            layer.int4_blocks[shard_id or 0] = loaded
            return
        super().weight_loader(layer, param, loaded, shard_id)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        blocks, layer.int4_blocks = layer.int4_blocks, {}
        if len(blocks) == len(layer.output_sizes):  # every shard came as blocks: the file's bytes, reshuffled
            whole = Int4Blocks.cat([blocks[i] for i in sorted(blocks)])
            layer.quantized = Int4Weight.from_blocks(whole, self.kernels, self.int8_activations)
            drop_plain_weight(layer)
            return
        for shard_id, shard in blocks.items():  # some shards came as floats: write these beside them
            shard_of(layer, layer.weight, shard_id).copy_(shard.dequantize())
        if layer.weight.shape[1] % INT4_GROUP_SIZE == 0:
            layer.quantized = Int4Weight(layer.weight.data, self.kernels, self.int8_activations)
            drop_plain_weight(layer)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.quantized is None:
            return super().apply(layer, x)
        return layer.quantized.linear(x, layer.bias)


class CInt8Method(DenseMethod):
    """Symmetric int8 per output column (--quantize int8, and the LM head of quantized models: the head is the
    largest matrix and the most sensitive). The float matrix stays only where something else shares it (a tied
    embedding)."""

    name = "int8_c"

    def __init__(self, kernels: KernelLibrary, int8_activations: bool):
        super().__init__()
        self.kernels, self.int8_activations = kernels, int8_activations and kernels.int8_activations

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.quantized = Int8Weight(layer.weight.data, self.kernels, self.int8_activations)
        if not layer.quantized.use_kernel:  # a width the kernel does not take: the plain GEMM
            layer.quantized = None
        elif not getattr(layer, "is_tied", False):
            drop_plain_weight(layer)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if getattr(layer, "quantized", None) is None:
            return super().apply(layer, x)
        return layer.quantized.linear(x, layer.bias)


class CQ8_0Method(CInt8Method):
    """GGUF Q8_0 blocks of 32 (a Q8_0 file's own blocks recovered exactly, see Q8_0Weight) on int8 activations:
    the LM head as llama.cpp applies it. Per block, not per row: the head keeps the file's precision."""

    name = "q8_0_c"

    def __init__(self, kernels: KernelLibrary):
        super().__init__(kernels, int8_activations=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.shape[1] % 32:  # a width the kernel does not take: the plain GEMM
            layer.quantized = None
            return
        layer.quantized = Q8_0Weight(layer.weight.data, self.kernels)
        if not getattr(layer, "is_tied", False):
            drop_plain_weight(layer)
