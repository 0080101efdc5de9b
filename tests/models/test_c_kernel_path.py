"""The CPU path's C kernels (ember/ops/csrc) through whole models, on the tiny random models of test_llama_vs_hf
(Llama, llama3 RoPE + tied head, biases, Qwen2, Qwen3's per-head norm, Mistral's sliding window):
- with float32 weights, every module on its C kernel against Hugging Face transformers (atol = rtol = 1e-4 on
  logits, as the torch path);
- with int4 weights (float32 or int8 activations; a float32 or float16 KV cache), decode steps through the fused
  per-layer C call (models/llama_fused_decode.py) against the same model's module-by-module path: bitwise equal
  (same kernels, same order, the same rounding into a half cache), for one sequence and for a batch mixing
  decodes with a speculative verification.
"""
import pytest
import torch

from test_llama_vs_hf import CASES, PROMPT_LEN, PagedCache, build_ember, build_hf, hf_logits, prompt

from ember.ops import cpu_kernels

ATOL = RTOL = 1e-4

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="no C compiler")


def with_c_kernels(model):
    for module in model.modules():
        if hasattr(module, "use_c_kernels"):
            module.use_c_kernels = True
    return model


@pytest.mark.parametrize("case", CASES)
def test_float32_model_on_the_c_kernels_matches_hf(case):
    hf, hf_config = build_hf(case)
    model = with_c_kernels(build_ember(hf, hf_config))
    tokens = prompt(PROMPT_LEN + 6, seed=3)
    cache = PagedCache(model)
    logits = [model.compute_logits(cache.step([(0, tokens[:PROMPT_LEN])]))]  # prefill: flash attention
    for token in tokens[PROMPT_LEN:]:  # decode: the C attention kernel
        logits.append(model.compute_logits(cache.step([(0, [token])])))
    torch.testing.assert_close(torch.cat(logits), hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_fused_decode_layers_equal_the_module_path_bitwise(case, int8_activations, kv_dtype, monkeypatch):
    if int8_activations and not cpu_kernels.int8_activations_supported():
        pytest.skip("no AVX512-VNNI")
    calls = []
    real = cpu_kernels.decoder_layer
    monkeypatch.setattr(cpu_kernels, "decoder_layer", lambda *args: calls.append(1) or real(*args))
    hf, hf_config = build_hf(case)
    model = with_c_kernels(build_ember(hf, hf_config))
    for module in model.modules():
        if hasattr(module, "int8_activations"):
            module.int8_activations = int8_activations
        if hasattr(module, "quantize"):
            module.quantize("int4")
    assert all(layer.mlp.down_proj.quantized.int8_activations == int8_activations for layer in model.model.layers)
    assert model.fuse_decode_layers()
    fused_layers = model.model.fused_layers

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
