"""Ember's C kernels for the CPU path (ember/ops/csrc) against PyTorch references: the 4-/8-bit matmuls on
both paths (registers up to 4 rows, dequantized panels beyond) at every tile shape (partial row tiles,
column groups and panels, a second chunk of rows), the fused RMSNorm (with residual, strided rows), SiLU-mul,
in-place rotary and paged attention for short queries (GQA, sliding window, mixed with a prefill), and the
int4 matmul with int8 activations (AVX512-VNNI builds) against its exact rounding. Each runs twice: the build
for this CPU (AVX-512 here) and the portable C build (-mno-avx512f: what a machine without AVX-512 compiles).
Float32 throughout: only summation order differs."""
import pytest
import torch
import torch.nn.functional as F

from ember.layers.attention import Attention, AttentionMetadata
from ember.layers.rotary import RotaryEmbedding, _rotate
from ember.ops import cpu_kernels
from ember.ops.attention import paged_attention
from ember.ops.linear import Int4Weight, Int8Weight

BUILDS = {"native": cpu_kernels.FLAGS, "portable": [*cpu_kernels.FLAGS, "-mno-avx512f"]}
TOL = dict(rtol=1e-5, atol=1e-5)
MATMUL_TOL = dict(rtol=1e-5, atol=5e-4)  # one running sum of up to 4096 products of size ~1 (sums ~64): ~1e-5 of it


@pytest.fixture(params=list(BUILDS))
def lib(request, monkeypatch):
    loaded = cpu_kernels.load(BUILDS[request.param])
    if loaded is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: loaded)
    return loaded


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("out_features,in_features", [(96, 128), (10, 1536), (3, 64), (21, 4096)])
def test_q4_linear_matches_the_dequantized_weight(lib, out_features, in_features):
    weight = torch.randn(out_features, in_features, generator=gen(0))
    layer = Int4Weight(weight)
    assert layer.use_kernel
    dequantized = layer.dequantized()
    assert dequantized.shape == weight.shape
    assert (dequantized - weight).abs().max() <= (layer.d.max() / 2) * 1.01  # round to nearest of 16 levels
    bias = torch.randn(out_features, generator=gen(1))
    for rows in [*range(1, 10), 19]:  # 1-4 rows: registers; 5 and more: panels (at K=4096, 19 rows are 2 chunks)
        x = torch.randn(rows, in_features, generator=gen(rows))
        torch.testing.assert_close(layer.linear(x, bias), F.linear(x, dequantized, bias), **MATMUL_TOL)


def test_q8_linear_matches_the_dequantized_weight(lib):
    weight = torch.randn(70, 96, generator=gen(2))
    layer = Int8Weight(weight)
    assert layer.use_kernel and layer.scales.dtype == torch.float32
    dequantized = layer.dequantized()
    assert (dequantized - weight).abs().max() <= layer.scales.max() / 2 * 1.01
    for rows in (1, 2, 3, 4, 5, 8, 9, 70):
        x = torch.randn(rows, 96, generator=gen(rows))
        torch.testing.assert_close(layer.linear(x, None), F.linear(x, dequantized), **MATMUL_TOL)


def test_quantized_rows_do_not_depend_on_the_batch(lib):
    """Bitwise: a row alone (register path) equals that row in a batch (panel path, any tile position)."""
    weight = torch.randn(37, 2048, generator=gen(3))  # a partial column group and panel; 2 chunks of rows at K=2048
    x = torch.randn(45, 2048, generator=gen(4))
    for layer in (Int4Weight(weight), Int8Weight(weight), Int4Weight(weight, int8_activations=True),
                  Int8Weight(weight, int8_activations=True)):
        whole = layer.linear(x, None)
        assert torch.equal(whole, torch.cat([layer.linear(x[i : i + 1], None) for i in range(45)]))
        assert torch.equal(whole[3:9], layer.linear(x[3:9], None))
        assert torch.equal(whole[5:8], layer.linear(x[5:8], None))


def int8_reference(x: torch.Tensor, layer: Int4Weight) -> torch.Tensor:
    """What qlinear_i8.c computes, in float64: x rounded to int8 per block of 32 (scale max|x| / 127, to nearest
    even), then d * dx * sum(q qx) + m * dx * sum(qx) per block."""
    rows, k = x.shape
    blocks = x.view(rows, k // 32, 32)  # the rounding in float32, as the kernel does it
    amax = blocks.abs().amax(-1, keepdim=True)
    qx = (blocks * torch.where(amax > 0, 127 / amax, 0)).round()  # [M, K / 32, 32]
    dx = amax / 127
    w = layer.dequantized().double()  # d * q + m: q and the block's d, m recovered exactly
    return torch.einsum("rbi,nbi->rn", (qx * dx).double(), w.view(-1, k // 32, 32))


@pytest.mark.parametrize("out_features,in_features", [(96, 128), (10, 1536), (3, 64), (21, 4096), (48, 576)])
def test_q4_int8_activations_match_the_rounded_reference(lib, out_features, in_features):
    weight = torch.randn(out_features, in_features, generator=gen(0))
    layer, exact = Int4Weight(weight, int8_activations=True), Int4Weight(weight)
    if not layer.int8_activations:
        pytest.skip("no AVX512-VNNI in this build")
    assert torch.equal(layer.dequantized(), exact.dequantized())  # the same weight, another layout
    for rows in [*range(1, 10), 19]:  # every tile shape: 1-4 rows x 1-3 column groups
        x = torch.randn(rows, in_features, generator=gen(rows)) * torch.rand(in_features, generator=gen(9)) * 4
        x[0, :32] = 0  # an all-zero block (scale 0)
        out = layer.linear(x, None)
        torch.testing.assert_close(out.double(), int8_reference(x, layer), rtol=1e-5, atol=5e-4)
        float_out = exact.linear(x, None)  # against float32 activations: x's rounding, ~0.5% of the output
        assert ((out - float_out).norm() / float_out.norm()).item() < 0.02


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as qlinear_i8.c does: to int8 per block of 32 (scale max|x| / 127, to nearest even), float64."""
    rows, k = x.shape
    blocks = x.view(rows, k // 32, 32)  # the rounding in float32, as the kernel does it
    amax = blocks.abs().amax(-1, keepdim=True)
    return ((blocks * torch.where(amax > 0, 127 / amax, 0)).round() * (amax / 127)).double().view(rows, k)


@pytest.mark.parametrize("out_features,in_features", [(70, 96), (3, 64), (49, 576), (21, 4096)])
def test_q8_int8_activations_match_the_rounded_reference(lib, out_features, in_features):
    weight = torch.randn(out_features, in_features, generator=gen(12))
    layer, exact = Int8Weight(weight, int8_activations=True), Int8Weight(weight)
    if not layer.int8_activations:
        pytest.skip("no AVX512-VNNI in this build")
    assert torch.equal(layer.dequantized(), exact.dequantized())  # the same weight, another layout
    for rows in [*range(1, 10), 19]:  # every tile shape: 1-4 rows x 1-3 column groups
        x = torch.randn(rows, in_features, generator=gen(rows)) * torch.rand(in_features, generator=gen(13)) * 4
        x[0, :32] = 0  # an all-zero block (scale 0)
        out = layer.linear(x, None)
        reference = rounded_activations(x) @ layer.dequantized().double().T
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=5e-4)
        float_out = exact.linear(x, None)  # against float32 activations: x's rounding, ~0.5% of the output
        assert ((out - float_out).norm() / float_out.norm()).item() < 0.02


def test_rms_norm_with_and_without_residual(lib):
    x, residual = torch.randn(5, 576, generator=gen(5)), torch.randn(5, 576, generator=gen(6))
    weight = torch.randn(576, generator=gen(7))
    torch.testing.assert_close(cpu_kernels.rms_norm(x, None, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5), **TOL)
    out, summed = cpu_kernels.rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, F.rms_norm(x + residual, (576,), weight, 1e-5), **TOL)


def test_rms_norm_on_strided_head_views(lib):
    qkv = torch.randn(3, 4 * 64 + 2 * 64, generator=gen(8))
    q = qkv[:, : 4 * 64].view(3, 4, 64)  # Qwen3's per-head norm on a view of the fused projection
    weight = torch.randn(64, generator=gen(9))
    torch.testing.assert_close(cpu_kernels.rms_norm(q, None, weight, 1e-6), F.rms_norm(q, (64,), weight, 1e-6), **TOL)


def test_silu_and_mul(lib):
    x = torch.randn(7, 2 * 1536, generator=gen(10)) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_and_mul(x), F.silu(gate) * up, **TOL)


def test_rotary_in_place_on_fused_qkv_views(lib):
    rope = RotaryEmbedding(64, 256, 10000.0)
    rope.use_c_kernels = True  # as the runner sets it
    qkv = torch.randn(5, (9 + 3 + 3) * 64, generator=gen(11))
    q, k = qkv[:, : 9 * 64].view(5, 9, 64), qkv[:, 9 * 64 : 12 * 64].view(5, 3, 64)
    v_before = qkv[:, 12 * 64 :].clone()
    positions = torch.tensor([0, 7, 100, 255, 3])
    cos, sin = rope.cos_cache[positions].unsqueeze(1), rope.sin_cache[positions].unsqueeze(1)
    expected_q, expected_k = _rotate(q.clone(), cos, sin), _rotate(k.clone(), cos, sin)
    out_q, out_k = rope(positions, q, k)
    assert out_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(out_q, expected_q, **TOL)
    torch.testing.assert_close(out_k, expected_k, **TOL)
    assert torch.equal(qkv[:, 12 * 64 :], v_before)


def test_without_the_kernels_the_torch_ops_serve(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    weight = torch.randn(32, 64, generator=gen(12))
    layer = Int4Weight(weight)
    assert not layer.use_kernel and not cpu_kernels.usable(weight)
    x = torch.randn(2, 64, generator=gen(13))
    assert (layer.linear(x, None) - F.linear(x, weight)).abs().max() < 0.1 * F.linear(x, weight).abs().max()


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [4, 32])  # runs shorter than the vector path's 16 keys, and longer
@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 2, 128), (4, 4, 80), (8, 1, 32),
                                                             (12, 1, 16)])
def test_attention_layer_matches_the_reference(lib, sliding_window, num_heads, num_kv_heads, head_dim, block_size,
                                               kv_dtype):
    """A mixed step (decodes, a speculative verification of 5; prefill chunks past the short-query kernel's
    limit, one after a prefix, one a whole prompt: the tiled kernel) through the layer, against the per-sequence
    reference, over a shuffled cache (float32, or half floats the kernels widen as they read); query rows are
    strided views of a fused projection, as in the model."""
    torch.manual_seed(0)
    num_blocks = 48
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(kv_dtype)
    q_lens, seq_lens = [1, 5, 1, 20, 1, 37], [1, 12, 30, 26, 9, 37]
    free = torch.randperm(num_blocks).tolist()
    block_tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    slots = [block_tables[s][p // block_size] * block_size + p % block_size
             for s, (q_len, n) in enumerate(zip(q_lens, seq_lens)) for p in range(n - q_len, n)]
    metadata = AttentionMetadata(slot_mapping=torch.tensor(slots), query_start_loc=starts, seq_lens=seq_lens,
                                 block_tables=block_tables)
    fused = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim)
    q = fused[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    k = fused[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(-1, num_kv_heads, head_dim)
    v = fused[:, (num_heads + num_kv_heads) * head_dim :].view(-1, num_kv_heads, head_dim)
    layer = Attention(head_dim**-0.5, sliding_window)
    layer.use_c_kernels = True  # as the runner sets it
    out = layer(q, k, v, kv_cache, metadata)  # writes this step's K/V, then attends
    assert metadata.c_kernel_tables().long_seq_ids.tolist() == [3, 5] and out.is_contiguous()
    reference = paged_attention(q, kv_cache[0], kv_cache[1], metadata, head_dim**-0.5, sliding_window)
    torch.testing.assert_close(out, reference, **TOL)


def test_the_runner_turns_the_kernels_on_for_float32_cpu_models():
    from ember import LLM
    from ember.layers.norm import RMSNorm

    llm = LLM(progress=False, max_model_len=256, kv_cache_memory_gib=0.05)
    norms = [m for m in llm.engine.runner.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.use_c_kernels for m in norms)
    assert not RMSNorm(8, 1e-6, torch.float32).use_c_kernels  # a bare layer keeps PyTorch's ops (the reference)
