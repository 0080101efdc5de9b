"""Ember's C kernels for the CPU path (ember/ops/csrc) against PyTorch references: the 4-/8-bit matmuls on
both paths (registers up to 4 rows, dequantized panels beyond) at every tile shape (partial row tiles,
column groups and panels, a second chunk of rows), the fused RMSNorm (with residual, strided rows), SiLU-mul,
in-place rotary and paged attention for short queries (GQA, sliding window, mixed with a prefill), and the
matmuls with int8 activations against their exact rounding. Each runs on every variant built at install that
this CPU runs (avx512_vnni, avx512, avx2, portable here), through its torch.library ops. Float32 throughout:
only summation order differs."""
import pytest
import torch
import torch.nn.functional as F

from ember.backends.attention import CKernelAttention
from ember.backends.attention_metadata import AttentionMetadata
from ember.backends.pointwise import CKernelPointwise, rotate
from ember.layers.attention import Attention
from ember.layers.rotary import RotaryEmbedding
from ember.ops.attention import paged_attention
from ember.ops.cpu_kernels import built_variants, load_library
from ember.ops.cpu_variants import BY_NAME, cpu_flags, runnable
from ember.ops.linear import Int4Weight, Int8Weight, Q8_0Weight

VARIANTS = [name for name in BY_NAME if name in built_variants() and runnable(BY_NAME[name], cpu_flags())]
TOL = dict(rtol=1e-5, atol=1e-5)
MATMUL_TOL = dict(rtol=1e-5, atol=5e-4)  # one running sum of up to 4096 products of size ~1 (sums ~64): ~1e-5 of it


@pytest.fixture(params=VARIANTS or [pytest.param(None, marks=pytest.mark.skip("no kernel library built"))])
def lib(request):
    return load_library(request.param)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("out_features,in_features", [(96, 128), (10, 1536), (3, 64), (21, 4096)])
def test_q4_linear_matches_the_dequantized_weight(lib, out_features, in_features):
    weight = torch.randn(out_features, in_features, generator=gen(0))
    layer = Int4Weight(weight, lib)
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
    layer = Int8Weight(weight, lib)
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
    for layer in (Int4Weight(weight, lib), Int8Weight(weight, lib), Int4Weight(weight, lib, int8_activations=True),
                  Int8Weight(weight, lib, int8_activations=True)):
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
    layer, exact = Int4Weight(weight, lib, int8_activations=True), Int4Weight(weight, lib)
    if not layer.int8_activations:
        pytest.skip(f"{lib.variant.name} has no int8-activation kernels")
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
    layer, exact = Int8Weight(weight, lib, int8_activations=True), Int8Weight(weight, lib)
    if not layer.int8_activations:
        pytest.skip(f"{lib.variant.name} has no int8-activation kernels")
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
    torch.testing.assert_close(lib.rms_norm(x, None, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5), **TOL)
    out, summed = lib.rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, F.rms_norm(x + residual, (576,), weight, 1e-5), **TOL)


def test_rms_norm_on_strided_head_views(lib):
    qkv = torch.randn(3, 4 * 64 + 2 * 64, generator=gen(8))
    q = qkv[:, : 4 * 64].view(3, 4, 64)  # Qwen3's per-head norm on a view of the fused projection
    weight = torch.randn(64, generator=gen(9))
    torch.testing.assert_close(lib.rms_norm(q, None, weight, 1e-6), F.rms_norm(q, (64,), weight, 1e-6), **TOL)


def test_silu_and_mul(lib):
    x = torch.randn(7, 2 * 1536, generator=gen(10)) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(lib.silu_and_mul(x), F.silu(gate) * up, **TOL)


def test_rotary_in_place_on_fused_qkv_views(lib):
    rope = RotaryEmbedding(64, 256, 10000.0, None, CKernelPointwise(lib))
    qkv = torch.randn(5, (9 + 3 + 3) * 64, generator=gen(11))
    q, k = qkv[:, : 9 * 64].view(5, 9, 64), qkv[:, 9 * 64 : 12 * 64].view(5, 3, 64)
    v_before = qkv[:, 12 * 64 :].clone()
    positions = torch.tensor([0, 7, 100, 255, 3])
    cos, sin = rope.cos_cache[positions].unsqueeze(1), rope.sin_cache[positions].unsqueeze(1)
    expected_q, expected_k = rotate(q.clone(), cos, sin), rotate(k.clone(), cos, sin)
    out_q, out_k = rope(positions, q, k)
    assert out_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(out_q, expected_q, **TOL)
    torch.testing.assert_close(out_k, expected_k, **TOL)
    assert torch.equal(qkv[:, 12 * 64 :], v_before)


def test_without_the_kernels_the_torch_ops_serve():
    weight = torch.randn(32, 64, generator=gen(12))
    layer = Int4Weight(weight, None)
    assert not layer.use_kernel
    x = torch.randn(2, 64, generator=gen(13))
    assert (layer.linear(x, None) - F.linear(x, weight)).abs().max() < 0.1 * F.linear(x, weight).abs().max()


def random_step(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, kv_dtype, seed=0):
    """A step over a shuffled paged cache: (q, k, v views of a fused projection, kv_cache, metadata)."""
    g = gen(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(kv_dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    slots = [block_tables[s][p // block_size] * block_size + p % block_size
             for s, (q_len, n) in enumerate(zip(q_lens, seq_lens)) for p in range(n - q_len, n)]
    metadata = AttentionMetadata(slot_mapping=torch.tensor(slots), query_start_loc=starts, seq_lens=seq_lens,
                                 block_tables=block_tables)
    fused = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim, generator=g)
    q = fused[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    k = fused[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(-1, num_kv_heads, head_dim)
    v = fused[:, (num_heads + num_kv_heads) * head_dim :].view(-1, num_kv_heads, head_dim)
    return q, k, v, kv_cache, metadata


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
    q_lens, seq_lens = [1, 5, 1, 20, 1, 37], [1, 12, 30, 26, 9, 37]
    q, k, v, kv_cache, metadata = random_step(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, kv_dtype)
    layer = Attention(head_dim**-0.5, sliding_window, CKernelAttention(lib))
    out = layer(q, k, v, kv_cache, metadata)  # writes this step's K/V, then attends
    assert metadata.c_kernel_tables.long_seq_ids.tolist() == [3, 5] and out.is_contiguous()
    reference = paged_attention(q, kv_cache[0], kv_cache[1], metadata, head_dim**-0.5, sliding_window)
    torch.testing.assert_close(out, reference, **TOL)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sliding_window", [None, 100])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 2, 128), (4, 4, 80)])
def test_long_contexts_match_the_reference(lib, sliding_window, num_heads, num_kv_heads, head_dim, kv_dtype):
    """Hundreds of keys (many 16-key tiles and cache blocks, windows spanning blocks): decodes and a
    verification at long contexts, a long prefill after a prefix and a whole prompt (the tiled kernel)."""
    q_lens, seq_lens = [1, 7, 300, 1, 257], [700, 333, 420, 129, 257]
    q, k, v, kv_cache, metadata = random_step(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, 16, kv_dtype)
    layer = Attention(head_dim**-0.5, sliding_window, CKernelAttention(lib))
    out = layer(q, k, v, kv_cache, metadata)
    assert metadata.c_kernel_tables.long_seq_ids.tolist() == [2, 4]
    reference = paged_attention(q, kv_cache[0], kv_cache[1], metadata, head_dim**-0.5, sliding_window)
    torch.testing.assert_close(out, reference, **TOL)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_attention_rows_do_not_depend_on_the_batch(lib, kv_dtype):
    """Bitwise: each sequence attended alone (by either kernel) equals its rows in the whole batch."""
    q_lens, seq_lens = [1, 5, 40, 1, 33], [50, 21, 90, 7, 33]
    q, k, v, kv_cache, metadata = random_step(q_lens, seq_lens, 9, 3, 64, 16, kv_dtype, seed=1)
    layer = Attention(64**-0.5, None, CKernelAttention(lib))
    whole = layer(q, k, v, kv_cache, metadata)  # also writes this step's K/V
    tables = metadata.c_kernel_tables
    starts = metadata.query_start_loc
    for long_queries, seq_ids in ((False, tables.short_seq_ids), (True, tables.long_seq_ids)):
        for s in seq_ids.tolist():
            alone = torch.full_like(whole, float("nan"))
            lib.paged_attention(q, kv_cache[0], kv_cache[1], torch.tensor([s]), tables.query_start_loc,
                                tables.seq_lens, tables.block_table, 64**-0.5, None, alone, long_queries)
            assert torch.equal(alone[starts[s] : starts[s + 1]], whole[starts[s] : starts[s + 1]])


@pytest.fixture
def restore_num_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sliding_window", [None, 300])
def test_split_contexts_do_not_depend_on_threads_or_the_batch(lib, sliding_window, kv_dtype, restore_num_threads):
    """Bitwise: decodes and a verification over contexts split into chunks (past 128 keys; a window spanning
    chunks) and not, with 1, 2 or 3 threads (the op reads torch.get_num_threads()), whole batch or alone."""
    q_lens, seq_lens = [1, 1, 6, 1, 1, 1], [1000, 129, 520, 128, 2100, 40]
    q, k, v, kv_cache, metadata = random_step(q_lens, seq_lens, 9, 3, 64, 16, kv_dtype, seed=2)
    layer = Attention(64**-0.5, sliding_window, CKernelAttention(lib))
    torch.set_num_threads(1)
    first = layer(q, k, v, kv_cache, metadata)  # writes this step's K/V
    reference = paged_attention(q, kv_cache[0], kv_cache[1], metadata, 64**-0.5, sliding_window)
    torch.testing.assert_close(first, reference, **TOL)
    tables = metadata.c_kernel_tables
    starts = metadata.query_start_loc
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        whole = torch.full_like(first, float("nan"))
        lib.paged_attention(q, kv_cache[0], kv_cache[1], tables.short_seq_ids, tables.query_start_loc,
                            tables.seq_lens, tables.block_table, 64**-0.5, sliding_window, whole, False)
        assert torch.equal(whole, first)
        for s in range(len(q_lens)):
            alone = torch.full_like(first, float("nan"))
            lib.paged_attention(q, kv_cache[0], kv_cache[1], torch.tensor([s]), tables.query_start_loc,
                                tables.seq_lens, tables.block_table, 64**-0.5, sliding_window, alone, False)
            assert torch.equal(alone[starts[s] : starts[s + 1]], first[starts[s] : starts[s + 1]])


@pytest.mark.skipif(not VARIANTS, reason="no kernel library built")
def test_the_runner_puts_float32_cpu_models_on_the_kernels():
    from ember import LLM
    from ember.layers.norm import RMSNorm

    llm = LLM(progress=False, max_model_len=256, kv_cache_memory_gib=0.05)
    norms = [m for m in llm.engine.runner.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.pointwise.kernels.variant.name == VARIANTS[0] for m in norms)


def q8_0_raw_blocks(weight: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 as llama.cpp quantizes it: per block of 32, d = max|w| / 127 (stored float16), q = round(w / d);
    the blocks' bytes [N, K/32 * 34] (d, then 32 int8)."""
    n, k = weight.shape
    blocks = weight.view(n, k // 32, 32)
    d = (blocks.abs().amax(-1) / 127).half()
    inv = torch.where(d.float() > 0, 1 / d.float(), 0)
    q = (blocks * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d[..., None].view(torch.uint8).view(n, k // 32, 2), q.view(torch.uint8)], -1).view(n, -1)


def dequantized_q8_0(raw: torch.Tensor, n: int, k: int) -> torch.Tensor:  # what a GGUF reader gives for the blocks
    blocks = raw.view(n, k // 32, 34)
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    return (blocks[..., 2:].contiguous().view(torch.int8).float() * d).view(n, k)


def q8_0_reference(x: torch.Tensor, raw: torch.Tensor, n: int) -> torch.Tensor:
    """What q8_0_i8_linear computes, in float64 from the raw blocks: x rounded per block (as quantize_rows), the
    integer dot product of each block, times d_w * dx."""
    rows, k = x.shape
    blocks = raw.view(n, k // 32, 34)
    dw = blocks[..., :2].contiguous().view(torch.float16).double()[..., 0]  # [N, K/32]
    qw = blocks[..., 2:].contiguous().view(torch.int8).double()  # [N, K/32, 32]
    xb = x.view(rows, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    qx = (xb * torch.where(amax > 0, 127 / amax, 0)).round().double()  # in float32, then exact
    dx = (amax / 127).double()[..., 0]  # [M, K/32]
    dots = torch.einsum("rbi,nbi->rnb", qx, qw)  # exact integers
    return (dots * dw[None] * dx[:, None]).sum(-1)


@pytest.mark.parametrize("out_features,in_features", [(70, 96), (3, 64), (49, 576), (21, 4096), (48, 32)])
def test_q8_0_recovers_a_q8_0_files_blocks_and_matches_the_rounded_reference(lib, out_features, in_features):
    if not lib.int8_activations:
        pytest.skip(f"{lib.variant.name} has no int8-activation kernels")
    weight = torch.randn(out_features, in_features, generator=gen(14)) * torch.rand(out_features, 1, generator=gen(15))
    weight[1, :32] = 0  # an all-zero weight block (d = 0)
    raw = q8_0_raw_blocks(weight)
    layer = Q8_0Weight(dequantized_q8_0(raw, out_features, in_features), lib)  # as the head gets it from the file
    assert torch.equal(q8_0_raw_blocks(layer.dequantized()), raw)  # the file's blocks, exactly
    for rows in [*range(1, 10), 19]:  # every tile shape: 1-4 rows x 1-3 column groups
        x = torch.randn(rows, in_features, generator=gen(rows)) * torch.rand(in_features, generator=gen(16)) * 4
        x[0, :32] = 0  # an all-zero block (scale 0)
        x[-1, -32:] *= 1000  # one large block (amax ~1e3)
        out = layer.linear(x, None)
        torch.testing.assert_close(out.double(), q8_0_reference(x, raw, out_features), rtol=1e-5, atol=5e-4)
        assert torch.equal(out[-1:], layer.linear(x[-1:], None))  # a row alone: the same bits


def test_the_int8_kernels_give_the_same_bits_on_every_vector_isa():
    """x's int8 values and scales and the integer sums are the same on every ISA, and the float FMAs run in one
    order per output: the AVX2 and AVX-512 variants agree bitwise."""
    torch.manual_seed(0)
    weight, x = torch.randn(100, 576), torch.randn(7, 576) * torch.rand(576) * 4
    results = {}
    for name in VARIANTS:
        lib = load_library(name)
        if lib.int8_activations:
            results[name] = [Int4Weight(weight, lib, True).linear(x, None), Int8Weight(weight, lib, True).linear(x, None),
                             Q8_0Weight(weight, lib).linear(x, None)]
    if len(results) < 2:
        pytest.skip("fewer than two vectorised variants run here")
    first, *others = results.values()
    for other in others:
        assert all(torch.equal(a, b) for a, b in zip(first, other))


def test_each_library_reports_its_isa_and_struct_sizes(lib):
    import ctypes

    from ember.ops.cpu_kernels import DecodeStep, DecoderLayer, Q4Linear

    assert lib.isa == lib.variant.name
    sizes = (ctypes.c_int64 * 3)()
    lib._lib.ember_struct_sizes(sizes)
    assert list(sizes) == [ctypes.sizeof(Q4Linear), ctypes.sizeof(DecoderLayer), ctypes.sizeof(DecodeStep)]
