"""Linear layers, plain or fused (several HF projections in one weight, loaded shard by shard). How the weight is
stored and multiplied is the layer's quant method (ember/backends), chosen at load."""
from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b, where W stacks one block of rows per entry of `output_sizes` (e.g. q, k, v).

    `method` creates the parameters (`weight`, `bias`, each with a `weight_loader(param, tensor, shard_id)`),
    prepares them once the checkpoint is loaded, and applies them."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, dtype: torch.dtype, method):
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.method = method
        method.create_weights(self, input_size, sum(self.output_sizes), bias, dtype)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, input_size] -> [num_tokens, sum(output_sizes)]
        return self.method.apply(self, x)
