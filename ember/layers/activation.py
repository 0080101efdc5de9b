"""SiluAndMul: the gated activation of the fused gate_up projection (computed by its pointwise backend)."""
import torch
from torch import nn


class SiluAndMul(nn.Module):
    def __init__(self, pointwise):
        super().__init__()
        self.pointwise = pointwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
        return self.pointwise.silu_and_mul(x)
