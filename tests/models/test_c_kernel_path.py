"""The CPU path's C kernels (ember/ops/csrc) through whole models, on the tiny random models of test_llama_vs_hf
(Llama, llama3 RoPE + tied head, biases, Qwen2, Qwen3's per-head norm, Mistral's sliding window), for every
kernel variant this CPU runs:
- with float32 weights, every module on its C kernel against Hugging Face transformers (atol = rtol = 1e-4 on
  logits, as the torch path);
- with int4 weights (float32 or int8 activations; a float32 or float16 KV cache), decode steps through the fused
  per-layer C call (backends/fused_decode.py) against the same model's module-by-module path: bitwise equal
  (same kernels, same order, the same rounding into a half cache), for one sequence and for a batch mixing
  decodes with a speculative verification.
"""
import pytest
import torch

from test_llama_vs_hf import CASES, PROMPT_LEN, PagedCache, build_ember, build_hf, hf_logits, prompt

from ember.backends import select_backends
from ember.ops.cpu_kernels import built_variants, load_library
from ember.ops.cpu_variants import BY_NAME, cpu_flags, runnable

ATOL = RTOL = 1e-4
VARIANTS = [name for name in BY_NAME if name in built_variants() and runnable(BY_NAME[name], cpu_flags())]

pytestmark = pytest.mark.skipif(not VARIANTS, reason="no CPU kernel library built (no C compiler at install)")


def c_kernel_backends(variant: str, quantize: str | None = None, int8_activations: bool = False):
    return select_backends(device=torch.device("cpu"), dtype=torch.float32, quantize=quantize, batch_invariant=False,
                           use_triton=False, kernels=load_library(variant), int8_activations=int8_activations)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_float32_model_on_the_c_kernels_matches_hf(case, variant):
    hf, hf_config = build_hf(case)
    model = build_ember(hf, hf_config, backends=c_kernel_backends(variant))
    assert model.model.norm.pointwise.kernels.variant.name == variant
    tokens = prompt(PROMPT_LEN + 6, seed=3)
    cache = PagedCache(model)
    logits = [model.compute_logits(cache.step([(0, tokens[:PROMPT_LEN])]))]  # prefill: the tiled kernel
    for token in tokens[PROMPT_LEN:]:  # decode: the short-query kernel
        logits.append(model.compute_logits(cache.step([(0, [token])])))
    torch.testing.assert_close(torch.cat(logits), hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_fused_decode_layers_equal_the_module_path_bitwise(case, int8_activations, kv_dtype, variant, monkeypatch):
    kernels = load_library(variant)
    if int8_activations and not kernels.int8_activations:
        pytest.skip(f"{variant} has no int8-activation kernels")
    calls = []
    real = type(kernels).decoder_layer
    monkeypatch.setattr(type(kernels), "decoder_layer", lambda self, *args: calls.append(1) or real(self, *args))
    hf, hf_config = build_hf(case)
    model = build_ember(hf, hf_config, backends=c_kernel_backends(variant, "int4", int8_activations))
    assert all(layer.mlp.down_proj.quantized.int8_activations == int8_activations for layer in model.model.layers)
    fused_layers = model.model.fused_layers
    assert fused_layers is not None

    def run(fused: bool) -> list[torch.Tensor]:
        model.model.fused_layers = fused_layers if fused else None
        cache = PagedCache(model, kv_dtype=kv_dtype)
        cache.step([(0, prompt(PROMPT_LEN, seed=4)), (1, prompt(9, seed=5)), (2, prompt(13, seed=6))])  # prefill
        steps = [[(0, [7])], [(0, [8]), (1, [9]), (2, [10])], [(0, [11]), (1, [12, 13, 14]), (2, [15])]]
        return [model.compute_logits(cache.step(chunks)) for chunks in steps]  # 1 decode; 3; 2 + a verification

    fused, modules = run(True), run(False)
    assert len(calls) == 3 * model.num_layers  # every decode step took the fused path (and the prefill did not)
    for a, b in zip(fused, modules, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_decode_does_not_depend_on_the_thread_count(variant):
    """Bitwise: the same decode steps through the fused layers with torch.set_num_threads(1) and (2)."""
    hf, hf_config = build_hf("llama3-rope-tied")
    model = build_ember(hf, hf_config, backends=c_kernel_backends(variant, "int4"))
    assert model.model.fused_layers is not None

    def run(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        cache = PagedCache(model)
        cache.step([(0, prompt(PROMPT_LEN, seed=4)), (1, prompt(9, seed=5))])  # prefill
        steps = [[(0, [7])], [(0, [8]), (1, [9, 10, 11])]]
        return [model.compute_logits(cache.step(chunks)) for chunks in steps]

    threads = torch.get_num_threads()
    try:
        one, two = run(1), run(2)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
