"""The dense linear method (vLLM's quant-method interface: create_weights, weight_loader,
process_weights_after_loading, apply), which the quantized methods build on: the float weight, filled shard by
shard from the checkpoint, and the plain (or batch-invariant) GEMM."""
from __future__ import annotations

import torch
from torch import nn

from ember.int4_blocks import Int4Blocks
from ember.ops.linear import linear
from ember.weight_copy import copy_checked


class DenseMethod:
    """y = x W^T + b on the float weight. `batch_invariant`: every GEMM at a fixed row count (ember.ops.linear)."""

    name = "dense"

    def __init__(self, batch_invariant: bool = False):
        self.batch_invariant = batch_invariant

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool, dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        layer.weight.weight_loader = lambda param, loaded, shard_id: self.weight_loader(layer, param, loaded, shard_id)
        layer.bias = None
        if bias:
            layer.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
            layer.bias.weight_loader = layer.weight.weight_loader

    def weight_loader(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor | Int4Blocks,
                      shard_id: int | None) -> None:
        """Copies a checkpoint tensor into the whole parameter (shard_id None) or into its shard_id-th row block."""
        copy_checked(shard_of(layer, param, shard_id), loaded)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        return linear(x, layer.weight, layer.bias, self.batch_invariant)


def shard_of(layer: nn.Module, param: nn.Parameter, shard_id: int | None) -> torch.Tensor:
    """The rows of `param` that checkpoint shard `shard_id` fills (all of it for None)."""
    if shard_id is None:
        return param.data
    offset = sum(layer.output_sizes[:shard_id])
    return param.data.narrow(0, offset, layer.output_sizes[shard_id])


def drop_plain_weight(layer: nn.Module) -> None:
    """The float matrix is no longer read (a quantized or repacked copy replaced it): free it, keep the shape's width."""
    layer.weight.data = layer.weight.data.new_empty(0, layer.weight.shape[1])
