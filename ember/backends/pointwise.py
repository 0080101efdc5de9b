"""Pointwise backends: RMSNorm (optionally fused with the residual add before it), SiLU-and-mul and rotary
embedding, as torch ops (the oracle), Ember's C kernels (CPU) or Triton kernels (GPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.ops.cpu_kernels import KernelLibrary


class TorchPointwise:
    name = "reference"

    def rms_norm(self, x, residual, weight, eps: float):
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            # One fused op; bitwise equal to HF's sequence below in float32 (checked), and row-independent.
            out = F.rms_norm(x, weight.shape, weight, eps)
            return out if residual is None else (out, residual)
        # Same op order as HF: statistics in float32, the weight applied in the model dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * h.to(x.dtype)
        return out if residual is None else (out, residual)

    def silu_and_mul(self, x):  # [num_tokens, 2 * d] -> [num_tokens, d]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary(self, positions, q, k, cos_cache, sin_cache):
        # q and k side by side: one rotation instead of two (a decode step is bound by per-op overhead)
        num_heads = q.shape[1]
        qk = rotate(torch.cat((q, k), dim=1), cos_cache[positions].unsqueeze(1), sin_cache[positions].unsqueeze(1))
        return qk[:, :num_heads], qk[:, num_heads:]


def rotate(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, 1, head_dim // 2]
    sin: torch.Tensor,  # [num_tokens, 1, head_dim // 2]
) -> torch.Tensor:
    # HF: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), with cos/sin cast to x's dtype first.
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CKernelPointwise(TorchPointwise):
    """The C kernels, for the float32 shapes they take (anything else: the torch ops)."""

    name = "c_kernels"

    def __init__(self, kernels: KernelLibrary):
        self.kernels = kernels

    def rms_norm(self, x, residual, weight, eps: float):
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            return super().rms_norm(x, residual, weight, eps)
        return self.kernels.rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x):
        if x.dim() != 2 or x.dtype != torch.float32:
            return super().silu_and_mul(x)
        return self.kernels.silu_and_mul(x.contiguous())

    def rotary(self, positions, q, k, cos_cache, sin_cache):
        if not (_heads_contiguous(q) and _heads_contiguous(k) and q.dtype == torch.float32):
            return super().rotary(positions, q, k, cos_cache, sin_cache)
        positions = positions.contiguous()
        self.kernels.rotary_(q, positions, cos_cache, sin_cache)  # in place, as the Triton kernel
        self.kernels.rotary_(k, positions, cos_cache, sin_cache)
        return q, k


def _heads_contiguous(x: torch.Tensor) -> bool:  # [num_tokens, num_heads, head_dim], any token stride
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


class TritonPointwise:
    name = "triton"

    def rms_norm(self, x, residual, weight, eps: float):
        from ember.ops import triton_norm

        if residual is None:
            return triton_norm.rms_norm(x, weight, eps)
        return triton_norm.fused_add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x):
        from ember.ops.triton_activation import silu_and_mul

        return silu_and_mul(x)

    def rotary(self, positions, q, k, cos_cache, sin_cache):
        from ember.ops.triton_rotary import rotary

        return rotary(positions, q, k, cos_cache, sin_cache)
