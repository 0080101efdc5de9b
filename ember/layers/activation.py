"""SiluAndMul: the gated activation of the fused gate_up projection."""
import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
