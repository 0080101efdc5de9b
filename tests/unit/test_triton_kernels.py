"""The Triton kernels in ember/ops against their torch references (layers/ and ops/linear.py); on a machine
without CUDA they run in Triton's interpreter on CPU tensors."""
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by @triton.jit when the kernel modules are imported

from ember.backends.pointwise import TorchPointwise  # noqa: E402
from ember.layers.activation import SiluAndMul  # noqa: E402
from ember.layers.norm import RMSNorm  # noqa: E402
from ember.layers.rotary import RotaryEmbedding  # noqa: E402
from ember.ops.linear import Int8Weight  # noqa: E402
from ember.ops.triton_activation import silu_and_mul  # noqa: E402
from ember.ops.triton_linear import TritonInt8Weight  # noqa: E402
from ember.ops.triton_norm import fused_add_rms_norm, rms_norm  # noqa: E402
from ember.ops.triton_rotary import rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter truncates float32 -> bf16 casts where the GPU rounds to nearest even, so results the
# GPU matches bit for bit are off by up to one bf16 ulp there.
IS_EXACT_BF16 = DEVICE == "cuda"
# One float32 rounding apart (summation order, rsqrt); in bf16 one or two ulps (2 ** -7 relative each) apart.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def assert_close_or_equal(actual, expected, dtype, is_exact):
    if is_exact:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def make_norm(hidden_size, dtype):
    norm = RMSNorm(hidden_size, 1e-6, dtype, TorchPointwise()).to(DEVICE)
    norm.weight.copy_(1 + 0.1 * torch.randn(hidden_size))
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_layer(dtype):
    torch.manual_seed(0)
    norm = make_norm(576, dtype)  # SmolLM2's hidden size, not a power of 2
    x = torch.randn(5, 576, device=DEVICE).to(dtype)
    residual = torch.randn(5, 576, device=DEVICE).to(dtype)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), **TOLERANCE[dtype])

    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    expected_out, expected_residual = norm(x, residual)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    assert_close_or_equal(new_residual, expected_residual, dtype, dtype == torch.float32 or IS_EXACT_BF16)
    torch.testing.assert_close(out, expected_out, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rms_norm_per_head_on_a_qkv_view(dtype, head_dim):
    # Qwen3's q/k norm: rows of head_dim inside the fused qkv output, a non-contiguous view.
    torch.manual_seed(0)
    num_tokens, num_heads, num_kv_heads = 3, 4, 2
    norm = make_norm(head_dim, dtype)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    assert not q.is_contiguous()
    out = rms_norm(q, norm.weight, norm.eps)
    assert out.shape == q.shape
    torch.testing.assert_close(out, norm(q), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_matches_layer_on_qkv_views(dtype, head_dim):
    torch.manual_seed(0)
    num_tokens, num_heads, num_kv_heads = 5, 4, 2
    rope = RotaryEmbedding(head_dim, max_position=64, base=10000.0, scaling=None, pointwise=TorchPointwise()).to(DEVICE)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.tensor([9, 0, 63, 4, 4], device=DEVICE)  # out of order, repeated, the last position
    expected_q, expected_k = rope(positions, q.clone(), k.clone())
    v_before = v.clone()

    q_out, k_out = rotary(positions, q, k, rope.cos_cache, rope.sin_cache)

    # In place: the results are q and k themselves, and v, between them in memory, is untouched.
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert torch.equal(v, v_before)
    # bf16: the kernel rounds once from float32, the layer after each product (on the GPU, one ulp apart at most);
    # the interpreter also truncates the intermediate products.
    for actual, expected in ((q_out, expected_q), (k_out, expected_k)):
        if dtype == torch.bfloat16 and not IS_EXACT_BF16:
            torch.testing.assert_close(actual, expected, atol=6e-2, rtol=1.6e-2)
        else:
            torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [300, 1100])  # 1100: more than one column block per row
def test_silu_and_mul_matches_layer(dtype, d):
    torch.manual_seed(0)
    x = (2 * torch.randn(3, 2 * d, device=DEVICE)).to(dtype)
    torch.testing.assert_close(silu_and_mul(x), SiluAndMul(TorchPointwise())(x), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 40, 130])  # decode, decode, mid, prefill tiles
@pytest.mark.parametrize("has_bias", [False, True])
def test_int8_linear_matches_dequantized_matmul(dtype, num_tokens, has_bias):
    torch.manual_seed(0)
    out_features, in_features = 72, 300  # multiples of no block size
    weight = torch.randn(out_features, in_features, device=DEVICE).to(dtype)
    bias = torch.randn(out_features, device=DEVICE).to(dtype) if has_bias else None
    layer = TritonInt8Weight(weight)
    # A column slice: rows of x are not contiguous with each other.
    x = torch.randn(num_tokens, in_features + 8, device=DEVICE).to(dtype)[:, 4 : 4 + in_features]

    out = layer.linear(x, bias)

    assert out.dtype == dtype and out.shape == (num_tokens, out_features)
    expected = x.float() @ (layer.weight.float() * layer.scales[:, None]).t()
    if has_bias:
        expected += bias.float()
    atol = 1e-4 if dtype == torch.float32 else 1e-2  # float32: sums of 300 products of magnitude ~1-100
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=TOLERANCE[dtype]["rtol"])


def test_int8_quantization_is_int8_weights():
    torch.manual_seed(0)
    weight = torch.randn(40, 64, dtype=torch.bfloat16, device=DEVICE)
    weight[3] = 0  # an all-zero channel: the clamped scale keeps it zero, not NaN
    layer = TritonInt8Weight(weight)
    reference = Int8Weight(weight.cpu(), None)
    assert layer.weight.dtype == torch.int8 and layer.weight.device == weight.device
    assert layer.scales.dtype == torch.float32 and layer.scales.shape == (40,)
    assert torch.equal(layer.weight.cpu(), reference.weight)
    assert torch.equal(layer.scales.cpu().to(torch.bfloat16), reference.scales)
    assert torch.equal(layer.weight[3], torch.zeros_like(layer.weight[3]))


def test_no_tokens():
    empty = torch.empty(0, 576, device=DEVICE)
    weight = torch.ones(576, device=DEVICE)
    assert rms_norm(empty, weight, 1e-6).shape == (0, 576)
    assert [t.shape for t in fused_add_rms_norm(empty, empty, weight, 1e-6)] == [(0, 576), (0, 576)]
    assert silu_and_mul(empty).shape == (0, 288)
    assert TritonInt8Weight(torch.randn(16, 576, device=DEVICE)).linear(empty, None).shape == (0, 16)
    rope = RotaryEmbedding(64, max_position=8, base=10000.0, scaling=None, pointwise=TorchPointwise()).to(DEVICE)
    q, k = torch.empty(0, 2, 64, device=DEVICE), torch.empty(0, 1, 64, device=DEVICE)
    positions = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert [t.shape for t in rotary(positions, q, k, rope.cos_cache, rope.sin_cache)] == [(0, 2, 64), (0, 1, 64)]
