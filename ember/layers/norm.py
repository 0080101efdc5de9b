"""RMSNorm, optionally fused with the residual add that precedes it."""
import torch
import torch.nn.functional as F
from torch import nn

from ember.ops import cpu_kernels


class RMSNorm(nn.Module):
    use_triton = False  # the GPU path's fused kernel (set by the runner)
    use_c_kernels = False  # the CPU path's C kernels, ember/ops/csrc (set by the runner)

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor,  # [..., hidden_size]
        residual: torch.Tensor | None = None,  # [..., hidden_size]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if self.use_triton:
            from ember.ops import triton_norm

            if residual is None:
                return triton_norm.rms_norm(x, self.weight, self.eps)
            return triton_norm.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if self.use_c_kernels and x.stride(-1) == 1:
            return cpu_kernels.rms_norm(x, None if residual is None else residual.contiguous(), self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op; bitwise equal to HF's sequence below in float32 (checked), and row-independent.
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return out if residual is None else (out, residual)
        # Same op order as HF: statistics in float32, the weight applied in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
