"""Triton SiluAndMul: silu(gate) * up over the fused gate_up output, computed in float32."""
import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024  # columns per program: wide rows (intermediate sizes of 10k+) are split over programs


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d], x's dtype
    """F.silu(gate) * up with one rounding to x's dtype at the end (the torch reference rounds twice: in bf16
    the two differ by about one ulp)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(triton.next_power_of_2(d), MAX_BLOCK)
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(d, block))](x, out, x.stride(0), d, BLOCK=block)
    return out
