"""The GPU path's weight-only int8 linear method (ember/ops/triton_linear.py): it replaces the plain matrix at
every batch size (the float matrix stays only where a tied embedding shares it)."""
from __future__ import annotations

import torch
from torch import nn

from ember.backends.linear_dense import DenseMethod, drop_plain_weight


class TritonInt8Method(DenseMethod):
    name = "int8_triton"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from ember.ops.triton_linear import TritonInt8Weight

        layer.quantized = TritonInt8Weight(layer.weight.data)
        if not getattr(layer, "is_tied", False):
            drop_plain_weight(layer)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.quantized.linear(x, layer.bias)
