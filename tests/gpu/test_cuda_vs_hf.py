"""The GPU path's model on the device against Hugging Face transformers on the same random weights (bfloat16
and float32), through the paged cache. Skipped without CUDA (tests/models/test_triton_path.py runs the same
kernels under Triton's interpreter on the CPU)."""
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # the tiny-model builders live beside the CPU tests
from test_llama_vs_hf import PROMPT_LEN, build_hf, prompt  # noqa: E402
from test_triton_path import PackedPagedCache, build_triton  # noqa: E402


@pytest.mark.parametrize("case", ["llama", "qwen3", "mistral-sliding-window"])
def test_float32_logits_match_hf_on_device(case):
    hf, model = build_triton(case)
    tokens = prompt(PROMPT_LEN, seed=2)
    with torch.no_grad():
        expected = hf.to("cuda")(torch.tensor([tokens], device="cuda")).logits[0].float()
    logits = model.compute_logits(PackedPagedCache(model).step([(0, tokens)]))
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)  # TF32 off by default; kernels reorder sums


def test_bfloat16_drift_within_hf_bfloat16():
    hf, _ = build_hf("llama")
    tokens = prompt(PROMPT_LEN, seed=4)
    with torch.no_grad():
        reference = hf.to("cuda")(torch.tensor([tokens], device="cuda")).logits[0].float()
        hf_error = (hf.to(torch.bfloat16)(torch.tensor([tokens], device="cuda")).logits[0].float() - reference).abs().max()
    _, model = build_triton("llama", torch.bfloat16)
    ember_error = (model.compute_logits(PackedPagedCache(model).step([(0, tokens)])) - reference).abs().max()
    assert ember_error <= 1.5 * hf_error
