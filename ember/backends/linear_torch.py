"""Linear methods on PyTorch's own CPU kernels, where Ember's C kernels are not built (or not asked for):
weight-only int4 / int8 matmuls (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`: bfloat16 activations, the
weight re-read per row) for up to 8 rows, and beyond them the float32 weight prepacked for oneDNN (or, for the LM
head, the transposed product on the plain matrix). Each output row is independent of the other rows."""
from __future__ import annotations

import torch
from torch import nn

from ember.backends.linear_dense import DenseMethod, drop_plain_weight
from ember.ops.linear import (INT4_GROUP_SIZE, TORCH_QUANTIZED_MAX_ROWS, Int4Weight, Int8Weight, PrepackedWeight,
                              TransposedProductWeight, can_prepack)


class TorchQuantizedMethod(DenseMethod):
    """`kind` "int4" or "int8" weights for small batches, a prepacked float32 weight for the rest."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.name = kind, f"{kind}_torch"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        layer.quantized = None
        if self.kind == "int8":
            layer.quantized = Int8Weight(weight, None)
        elif weight.shape[1] % INT4_GROUP_SIZE == 0:
            layer.quantized = Int4Weight(weight, None)
        layer.prepacked = PrepackedWeight(weight) if can_prepack(layer.weight) else None
        if layer.prepacked is not None:
            drop_plain_weight(layer)  # only the packed copy is read beyond the quantized one's rows

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.quantized is not None and x.shape[0] <= TORCH_QUANTIZED_MAX_ROWS:
            return layer.quantized.linear(x, layer.bias)
        if layer.prepacked is not None:
            return layer.prepacked.linear(x, layer.bias)
        return super().apply(layer, x)


class TorchInt8HeadMethod(DenseMethod):
    """The LM head: int8 for small batches; beyond, the transposed product on the plain matrix (often tied to the
    embedding, so it keeps its plain layout: MKL runs this tall, thin product ~2x faster at 16-64 rows)."""

    name = "int8_torch"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.quantized = Int8Weight(layer.weight.data, None)
        layer.transposed = TransposedProductWeight(layer.weight.data)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= TORCH_QUANTIZED_MAX_ROWS:
            return layer.quantized.linear(x, layer.bias)
        return layer.transposed.linear(x, layer.bias)
