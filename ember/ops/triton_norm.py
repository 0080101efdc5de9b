"""Triton RMSNorm, optionally fused with the residual add before it; same math and op order as layers/norm.py."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    num_inner, x_stride_outer, x_stride_inner, r_stride_outer, r_stride_inner, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # One row per program; a row is x[outer, inner, :], so per-head views of a fused qkv need no copy.
    row = tl.program_id(0).to(tl.int64)
    outer, inner = row // num_inner, row % num_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + outer * x_stride_outer + inner * x_stride_inner + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + outer * r_stride_outer + inner * r_stride_inner + cols, mask=mask, other=0.0)
        # One rounding of the float32 sum to x's dtype, as torch adds two bf16 / fp16 tensors.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(new_residual_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    # HF rounds the normalized row to the model dtype before the weight multiplies it.
    h = (h * rstd).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    """(x with unit stride on its last dim, num_rows, num_inner, stride_outer, stride_inner) for [n, hidden] or
    [n, num_heads, head_dim]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x, x.shape[0], 1, x.stride(0), 0
    assert x.dim() == 3, f"expected [num_tokens, hidden] or [num_tokens, num_heads, head_dim], got {tuple(x.shape)}"
    return x, x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)


def _launch(x, residual, weight, eps):
    x, num_rows, num_inner, x_stride_outer, x_stride_inner = _rows(x)
    hidden = x.shape[-1]
    # weight * h.to(x.dtype) promotes as torch does (a float32 weight on bf16 activations gives float32).
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual, r_stride_outer, r_stride_inner = out, 0, 0  # placeholders, unused without a residual
    if residual is not None:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
        residual, _, _, r_stride_outer, r_stride_inner = _rows(residual)
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x, residual, weight.contiguous(), out, new_residual,
            num_inner, x_stride_outer, x_stride_inner, r_stride_outer, r_stride_inner, hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
        )
    return out, new_residual


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden] or [num_tokens, num_heads, head_dim]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # x's shape, contiguous
    """RMSNorm(x): statistics in float32, then weight * normalized.to(x.dtype)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (out, new_residual), both x's shape, contiguous
    """(RMSNorm(x + residual), x + residual), the sum in x's dtype; neither input is modified."""
    return _launch(x, residual, weight, eps)
