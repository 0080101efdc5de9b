"""Triton int8 weight-only linear for the GPU: symmetric int8 per output channel, float32 accumulation, the
scale and bias applied once per output tile."""
import torch
import triton
import triton.language as tl

NUM_SMS = 132  # an H100's: decode tiles are cut fine enough to give each SM one


@triton.jit
def _int8_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om,
    HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles run one after another on the same weight columns, so a prompt's weight
    # tiles are still in L2 when the next row tiles need them.
    pid = tl.program_id(0)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    # Rows and columns past the edge wrap onto valid ones (their results are never stored), so only K is masked.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N], W^T's tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0)
        # int8 is exact in bf16 / fp16 / fp32. The float32 step is a few conversions per tile on the GPU; without
        # it Triton's interpreter casts int8 to bf16 as raw bits. "ieee" matters only for float32 x (else TF32).
        acc = tl.dot(x, w.to(tl.float32).to(x.dtype), acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


def _config(M: int, N: int) -> dict:
    """Tile sizes by row count (tl.dot wants every tile dim >= 16)."""
    if M <= 16:
        # Decode: reading the weight is the whole cost. Long K tiles keep many bytes in flight per program,
        # and N is cut fine enough that every SM streams its share.
        block_n = next(b for b in (64, 32, 16) if triton.cdiv(N, b) >= NUM_SMS or b == 16)
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    # Prefill: compute-bound, the usual large tensor-core tiles.
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


class TritonInt8Weight:
    """Symmetric int8 per output channel (the same int8 values as ops/linear.py Int8Weight, with float32 scales)."""

    def __init__(self, weight: torch.Tensor):  # [out_features, in_features], float / bf16, any device
        w = weight.float()
        # max |w| without an abs() copy of the matrix, as Int8Weight computes it
        scale = (torch.maximum(-w.amin(1), w.amax(1)) / 127).clamp(min=1e-12)  # [out] float32
        self.weight = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # [out, in] int8
        self.scales = scale  # [out] float32

    def linear(
        self,
        x: torch.Tensor,  # [num_tokens, in_features] bf16 / fp16 / fp32
        bias: torch.Tensor | None,  # [out_features]
    ) -> torch.Tensor:  # [num_tokens, out_features], x's dtype
        N, K = self.weight.shape
        assert x.shape[-1] == K, f"x has {x.shape[-1]} features, the weight {K}"
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        if M:
            config = _config(M, N)
            grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
            _int8_linear_kernel[grid](
                x2, self.weight, self.scales, bias, out, M, N, K,
                x2.stride(0), x2.stride(1), self.weight.stride(0), self.weight.stride(1), out.stride(0),
                # CPU tensors mean Triton's interpreter, whose tl.dot multiplies bf16 tiles as their raw bits:
                # float32 holds the same products exactly.
                HAS_BIAS=bias is not None, DOT_IN_FP32=x.device.type == "cpu", **config,
            )
        return out.view(*x.shape[:-1], N)
