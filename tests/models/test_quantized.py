"""The weight-only quantized decode path: int4 layers and an int8 head against the dense float32 path on the
same weights; and the oneDNN-prepacked float32 weights that serve larger batches.

Tolerance: with Ember's C kernels (ember/ops/csrc) activations stay float32, so a Q4_1 weight's product
matches the dense one to float32 rounding and only re-quantizing a float weight moves results. Without them
(no C compiler) PyTorch's packed kernels round activations to bfloat16: logprobs then move by up to ~0.1 nat
on the embedded model. Either way greedy text stays the same except at near-ties; the dense path stays the
exact reference."""
from __future__ import annotations

import pytest
import torch

from ember import LLM, SamplingParams
from ember.backends.linear_c_kernels import CInt4Method, CInt8Method
from ember.backends.linear_dense import DenseMethod
from ember.backends.linear_torch import TorchInt8HeadMethod, TorchQuantizedMethod
from ember.int4_blocks import Int4Blocks
from ember.layers.embedding import LMHead
from ember.layers.linear import Linear
from ember.loader import load_checkpoint
from ember.ops.cpu_kernels import select_kernels
from ember.ops.linear import TORCH_QUANTIZED_MAX_ROWS, Int4Weight, Int8Weight

KERNELS = select_kernels("auto")  # the library start-up picks here (None without a C compiler at install)
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="Ember's C kernels are not built")


def load(layer, *shards) -> None:
    """Each (tensor, shard_id) through the parameter's loader, as the model's load_weights does, then the method's
    preparation."""
    for param, tensor, shard_id in shards:
        param.weight_loader(param, tensor, shard_id)
    layer.process_weights_after_loading()


def q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """w = d * q + m per block of 32, every block spanning q = 0..15 as llama.cpp's Q4_1 quantizer makes it;
    d and m on a dyadic grid so that the kernel's bfloat16 scale and zero (m + 8d) are exact."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = in_features // 32
    q = torch.randint(0, 16, (out_features, num_blocks, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.randint(1, 8, (out_features, num_blocks, 1), generator=g) / 256
    m = torch.randint(-64, 0, (out_features, num_blocks, 1), generator=g) / 256
    return (d * q + m).view(out_features, in_features)


@pytest.mark.parametrize("c_kernels", [True, False])
def test_int4_recovers_a_q4_1_weight_exactly(c_kernels):
    weight = q4_1_weight(96, 128)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    layer = Int4Weight(weight, KERNELS if c_kernels else None)
    out = layer.linear(x, None)
    if layer.use_kernel:  # the weight is exact, activations float32
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
    else:  # the weight is exact; PyTorch's kernel takes bfloat16 activations and rounds its output to bfloat16
        reference = torch.nn.functional.linear(x.to(torch.bfloat16).float(), weight)
        torch.testing.assert_close(out, reference, rtol=2**-7, atol=1e-3)


def test_int4_and_int8_rows_do_not_depend_on_the_batch():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(3))
    for quantized in (Int4Weight(weight, KERNELS), Int8Weight(weight, KERNELS)):
        whole = quantized.linear(x, None)
        alone = torch.cat([quantized.linear(x[i : i + 1], None) for i in range(7)])
        assert torch.equal(whole, alone)


def test_int8_head_is_close_to_dense():
    weight = torch.randn(1000, 64, generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    out = Int8Weight(weight, KERNELS).linear(x, None)
    reference = torch.nn.functional.linear(x, weight)
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()


@pytest.mark.parametrize("c_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_quantized_linear_replaces_the_plain_matrix(c_kernels):
    """On the C kernels the int4 copy serves every batch; on PyTorch's, up to 8 rows, and the float32 weight
    prepacked for oneDNN the rest. Either way only one copy of the matrix is kept."""
    weight, bias = q4_1_weight(96, 128, seed=6), torch.randn(96, generator=torch.Generator().manual_seed(7))
    method = CInt4Method(KERNELS, int8_activations=False) if c_kernels else TorchQuantizedMethod("int4")
    layer = Linear(128, [64, 32], bias=True, dtype=torch.float32, method=method)
    load(layer, (layer.weight, weight[:64], 0), (layer.weight, weight[64:], 1), (layer.bias, bias, None))
    assert layer.weight.numel() == 0 and layer.quantized.use_kernel == c_kernels
    assert (getattr(layer, "prepacked", None) is None) == c_kernels
    for num_rows in (1, TORCH_QUANTIZED_MAX_ROWS, TORCH_QUANTIZED_MAX_ROWS + 1, 40, 300):
        x = torch.randn(num_rows, 128, generator=torch.Generator().manual_seed(num_rows))
        reference = torch.nn.functional.linear(x, weight, bias)
        if num_rows <= TORCH_QUANTIZED_MAX_ROWS and not c_kernels:  # bfloat16 activations and output
            torch.testing.assert_close(layer(x), reference, rtol=2**-7, atol=0.05)
        else:  # float32 throughout (the weight is an exact Q4_1 one): only the summation order differs
            torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


def q4_1_blocks(weight: torch.Tensor) -> Int4Blocks:
    """The Int4Blocks of a `q4_1_weight` (each block spans q = 0..15, so min-max recovers d, m and q)."""
    groups = weight.view(weight.shape[0], -1, 32)
    m = groups.amin(-1)
    d = (groups.amax(-1) - m) / 15
    q = ((groups - m[..., None]) / d[..., None]).round().to(torch.uint8)
    return Int4Blocks(q[..., :16] | (q[..., 16:] << 4), d, m)


@needs_kernels
@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("shards_as_blocks", [(0, 1), (0,)])
def test_linear_from_gguf_blocks_equals_the_float_path(int8_activations, shards_as_blocks):
    """A Linear given GGUF blocks builds the same int4 copy as from the float weight, and never writes its float
    matrix; with only some shards as blocks it dequantizes them beside the others."""
    weight = q4_1_weight(96, 128, seed=10)
    assert torch.equal(q4_1_blocks(weight).dequantize(), weight)
    layers = []
    for blocks in (True, False):
        layer = Linear(128, [64, 32], bias=False, dtype=torch.float32, method=CInt4Method(KERNELS, int8_activations))
        load(layer, *((layer.weight, q4_1_blocks(rows) if blocks and shard_id in shards_as_blocks else rows, shard_id)
                      for shard_id, rows in enumerate((weight[:64], weight[64:]))))
        assert layer.weight.numel() == 0 and not layer.int4_blocks
        layers.append(layer)
    from_blocks, from_floats = layers
    assert from_blocks.quantized.int8_activations == from_floats.quantized.int8_activations
    for name in ("qs", "d", "m"):
        assert torch.equal(getattr(from_blocks.quantized, name), getattr(from_floats.quantized, name)), name
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(11))
    assert torch.equal(from_blocks(x), from_floats(x))


@pytest.mark.parametrize("method", [pytest.param("c", marks=needs_kernels), "dense"])
def test_linear_refuses_blocks_of_the_wrong_shape(method):
    method = CInt4Method(KERNELS, False) if method == "c" else DenseMethod()
    layer = Linear(128, [64, 32], bias=False, dtype=torch.float32, method=method)
    with pytest.raises(ValueError, match=r"\(32, 128\) does not match expected \(64, 128\)"):
        layer.weight.weight_loader(layer.weight, q4_1_blocks(q4_1_weight(32, 128)), 0)


def test_batch_invariant_linear_keeps_its_plain_weight():
    layer = Linear(64, [32], bias=False, dtype=torch.float32, method=DenseMethod(batch_invariant=True))
    load(layer, (layer.weight, torch.randn(32, 64), None))
    x = torch.randn(20, 64)
    assert layer.weight.shape == (32, 64) and getattr(layer, "prepacked", None) is None
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=0, atol=1e-5)


def test_lm_head_beyond_the_torch_int8_rows_is_float32():
    head = LMHead(64, 1000, torch.float32, TorchInt8HeadMethod())  # PyTorch's int8 kernel: up to 8 rows
    head.weight.data.copy_(torch.randn(1000, 64, generator=torch.Generator().manual_seed(8)))
    head.process_weights_after_loading()
    x = torch.randn(TORCH_QUANTIZED_MAX_ROWS + 4, 64, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_lm_head_on_the_c_kernel_is_int8_at_every_batch_and_drops_its_untied_matrix():
    head = LMHead(64, 1000, torch.float32, CInt8Method(KERNELS, int8_activations=True))
    weight = torch.randn(1000, 64, generator=torch.Generator().manual_seed(8))
    head.weight.data.copy_(weight)
    head.process_weights_after_loading()
    assert head.quantized.use_kernel and head.weight.numel() == 0
    x = torch.randn(70, 64, generator=torch.Generator().manual_seed(9))
    out = head(x)
    assert torch.equal(out[:3], head(x[:3]))  # the same int8 product at 3 rows and at 70
    assert (out - torch.nn.functional.linear(x, weight)).abs().max() < 0.02 * out.abs().max()


OPTIONS = dict(progress=False, max_model_len=512, kv_cache_memory_gib=0.1)


@pytest.fixture(scope="module")
def dense_and_int4():
    # The int4 engine keeps a float32 KV cache: this compares the weights' quantization alone (the half cache
    # it would take by default has a test of its own).
    return LLM(quantize="none", **OPTIONS), LLM(quantize="int4", kv_cache_dtype="float32", **OPTIONS)


def test_embedded_model_int4_copies_are_the_files_blocks(dense_and_int4):
    """The engine builds its int4 copies from the GGUF's Q4_1 blocks; min-max requantizing the dequantized
    floats (the path for other checkpoints) recovers the very same q, d and m on this file."""
    _, int4 = dense_and_int4
    checkpoint = load_checkpoint(int4.engine.model_path, progress=False)
    layer = int4.engine.runner.model.model.layers[3]
    for name, module, hf_names in (("qkv", layer.self_attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
                                   ("down", layer.mlp.down_proj, ("down_proj",))):
        prefix = "model.layers.3." + ("self_attn." if name == "qkv" else "mlp.")
        weight = torch.cat([checkpoint.tensors[prefix + n + ".weight"] for n in hf_names])
        requantized = Int4Weight(weight, KERNELS, module.quantized.int8_activations)
        for field in ("qs", "d", "m"):
            assert torch.equal(getattr(module.quantized, field), getattr(requantized, field)), (name, field)


def test_embedded_model_int4_stays_close_to_dense(dense_and_int4):
    dense, int4 = dense_and_int4
    head = int4.engine.runner.model.lm_head  # "auto" would pick int4 too for this Q4_1 file
    # On kernels with int8 activations the head is the file's Q8_0 blocks, as llama.cpp applies them
    expected = "q8_0_c" if KERNELS is not None and KERNELS.int8_activations else "int8_torch" if KERNELS is None else "int8_c"
    assert head.quantized is not None and head.method.name == expected
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=5)
    prompts = ["def fibonacci(n):", "Once upon a time"]
    for a, b in zip(dense.generate(prompts, params), int4.generate(prompts, params)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(step_a[0].logprob - step_b[0].logprob) < 0.25


def test_a_half_kv_cache_is_the_default_for_quantized_weights_and_stays_close(dense_and_int4):
    """auto: float16 K/V where int4 weights run on the C kernels, the model's float32 otherwise. The half cache
    on its own (dense weights both sides) moves the embedded model's log-probabilities by a few thousandths
    (<= 0.0033 over 6 prompts x 24 tokens when measured); the greedy tokens stay the same."""
    dense, _ = dense_and_int4
    assert dense.engine.runner.kv_dtype == torch.float32
    if KERNELS is not None:
        assert LLM(quantize="int4", **OPTIONS).engine.runner.kv_dtype == torch.float16
    half = LLM(quantize="none", kv_cache_dtype="float16", **OPTIONS)
    assert half.engine.runner.kv_caches[0].dtype == torch.float16
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=5)
    prompts = ["def fibonacci(n):", "Once upon a time", "The capital of France is"]
    for a, b in zip(dense.generate(prompts, params), half.generate(prompts, params)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(step_a[0].logprob - step_b[0].logprob) < 0.02


@needs_kernels
def test_embedded_model_head_is_the_files_q8_0_blocks(dense_and_int4):
    """The embedded file's head (its tied token_embd, Q8_0) is applied as the file stores it: Q8_0Weight's blocks
    dequantize to exactly the file's values (re-quantizing per row would round them again)."""
    if not KERNELS.int8_activations:
        pytest.skip("the kernels have no int8 activations")
    dense, int4 = dense_and_int4
    head = int4.engine.runner.model.lm_head.quantized
    assert torch.equal(head.dequantized(), dense.engine.runner.model.model.embed_tokens.weight)
