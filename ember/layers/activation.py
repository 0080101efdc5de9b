"""SiluAndMul: the gated activation of the fused gate_up projection."""
import torch
import torch.nn.functional as F
from torch import nn

from ember.ops import cpu_kernels


class SiluAndMul(nn.Module):
    use_triton = False  # the GPU path's fused kernel (set by the runner)
    use_c_kernels = False  # the CPU path's C kernels, ember/ops/csrc (set by the runner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
        if self.use_triton:
            from ember.ops.triton_activation import silu_and_mul

            return silu_and_mul(x)
        if self.use_c_kernels and x.dim() == 2:
            return cpu_kernels.silu_and_mul(x.contiguous())
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
