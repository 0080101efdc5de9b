"""Dense linear layers, plain or fused (several HF projections in one weight, loaded shard by shard).

A quantized weight-only linear can replace `Linear` by offering the same constructor, `forward` and a
`weight_loader(param, tensor, shard_id)` attribute on its parameters.
"""
import torch
from torch import nn

from ember.ops.linear import linear


class Linear(nn.Module):
    """y = x W^T + b, where W stacks one block of rows per entry of `output_sizes` (e.g. q, k, v)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        batch_invariant: bool = False,
    ):
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.batch_invariant = batch_invariant
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(output_sizes), dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        """Copies a checkpoint tensor into the whole parameter (shard_id None) or into its shard_id-th row block."""
        target = param.data
        if shard_id is not None:
            offset = sum(self.output_sizes[:shard_id])
            target = target.narrow(0, offset, self.output_sizes[shard_id])
        copy_checked(target, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, input_size] -> [num_tokens, sum(output_sizes)]
        return linear(x, self.weight, self.bias, self.batch_invariant)


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """In-place copy (casting dtype) that refuses a shape mismatch instead of broadcasting."""
    if tuple(loaded.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match expected {tuple(target.shape)}")
    target.copy_(loaded)
