"""Triton rotary embedding (HF rotate_half layout), in place on q and k; same math as layers/rotary.py."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, token, stride_token, stride_head, stride_dim, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    first = x_ptr + token * stride_token + heads * stride_head + dims * stride_dim  # [BLOCK_HEADS, BLOCK_HALF]
    second = first + HALF * stride_dim
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    # Each product rounded to x's dtype, as torch's one-op-at-a-time reference does: bf16 / fp16 products
    # are exact in float32, so this matches the reference bit for bit.
    x1_cos, x2_sin = (x1 * cos).to(dtype).to(tl.float32), (x2 * sin).to(dtype).to(tl.float32)
    x2_cos, x1_sin = (x2 * cos).to(dtype).to(tl.float32), (x1 * sin).to(dtype).to(tl.float32)
    tl.store(first, (x1_cos - x2_sin).to(dtype), mask=mask)
    tl.store(second, (x2_cos + x1_sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, cache_stride,
    q_stride_token, q_stride_head, q_stride_dim, k_stride_token, k_stride_head, k_stride_dim,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
):
    # One token per program: its cos/sin row is read once for all of its q and k heads.
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + position * cache_stride + dims, mask=dims < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * cache_stride + dims, mask=dims < HALF, other=0.0)[None, :]
    # HF casts the float32 cache to x's dtype before the products.
    cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    _rotate_heads(q_ptr, token, q_stride_token, q_stride_head, q_stride_dim, num_heads, cos, sin,
                  HALF, BLOCK_Q_HEADS, BLOCK_HALF)
    _rotate_heads(k_ptr, token, k_stride_token, k_stride_head, k_stride_dim, num_kv_heads, cos, sin,
                  HALF, BLOCK_K_HEADS, BLOCK_HALF)


def rotary(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], any strides (e.g. a view of the fused qkv output)
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], same dtype as q
    cos_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    sin_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k IN PLACE (their storage is overwritten) and returns them, equal to
    RotaryEmbedding.forward(positions, q, k) (bitwise in bf16 / fp16)."""
    assert q.dtype == k.dtype and q.shape[-1] == k.shape[-1], "q and k must share dtype and head_dim"
    num_tokens, num_heads, head_dim = q.shape
    half = head_dim // 2
    assert cos_cache.shape[-1] == half and cos_cache.stride() == sin_cache.stride() and cos_cache.stride(-1) == 1
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, q, k, cos_cache, sin_cache, cos_cache.stride(0),
            *q.stride(), *k.stride(), num_heads, k.shape[1],
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_Q_HEADS=triton.next_power_of_2(num_heads), BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
        )
    return q, k
