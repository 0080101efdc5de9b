"""The GPU path on a real device: the engine end to end (Triton kernels, CUDA graphs, the KV cache sized from
free memory, int8 weights) against the CPU path and Hugging Face transformers. Skipped without CUDA."""
import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from ember import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
# gpu_memory_utilization caps the device's whole use, other engines included: the module's engine takes a third,
# and each engine a test builds beside it a cap that leaves it room.
SHARED_UTILIZATION = 0.3


@pytest.fixture(scope="module")
def cuda_llm():
    return LLM(progress=False, device="cuda", dtype="float32", quantize="none", max_model_len=512, max_num_seqs=8,
               gpu_memory_utilization=SHARED_UTILIZATION)


def release(llm) -> None:
    del llm.engine
    gc.collect()
    torch.cuda.empty_cache()


def test_defaults_select_the_gpu_path(cuda_llm):
    runner = cuda_llm.engine.runner
    assert runner.device.type == "cuda" and runner.use_triton and runner.graphs is not None and runner.use_lookahead
    assert runner.kv_caches[0].is_cuda and runner.num_blocks > 0
    free, total = torch.cuda.mem_get_info()
    assert total - free <= (SHARED_UTILIZATION + 0.05) * total  # the KV cache stayed within the cap, and a margin


def test_greedy_matches_the_cpu_path(cuda_llm):
    cpu = LLM(progress=False, device="cpu", max_model_len=512, quantize="none")
    expected = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in cuda_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    # float32 on both; summation orders differ, so allow a late divergence but require a long common prefix
    for e, g in zip(expected, got):
        common = next((i for i, (a, b) in enumerate(zip(e, g)) if a != b), len(e))
        assert common >= 16, (e, g)


def test_cuda_graphs_match_eager(cuda_llm):
    eager = LLM(progress=False, device="cuda", dtype="float32", quantize="none", max_model_len=512, max_num_seqs=8,
                enforce_eager=True, gpu_memory_utilization=2 * SHARED_UTILIZATION)
    assert eager.engine.runner.graphs is None and not eager.engine.runner.use_lookahead
    for n in (1, 3):  # bucket 1, and 3 padded to bucket 4
        a = [o.outputs[0].token_ids for o in cuda_llm.generate(PROMPTS[:n], GREEDY, use_tqdm=False)]
        b = [o.outputs[0].token_ids for o in eager.generate(PROMPTS[:n], GREEDY, use_tqdm=False)]
        assert a == b
    assert cuda_llm.engine.runner.num_lookahead_rows_used > 0  # the graphs' side ran its decodes ahead
    release(eager)


def test_batched_equals_alone(cuda_llm):
    alone = [cuda_llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    batched = [o.outputs[0].token_ids for o in cuda_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert batched == alone


def test_bfloat16_int8_gguf_runs_and_stays_close():
    """The embedded GGUF on the GPU: auto picks bfloat16 and int8 weights (a Q4_1 file)."""
    llm = LLM(progress=False, device="cuda", max_model_len=512, max_num_seqs=4,
              gpu_memory_utilization=2 * SHARED_UTILIZATION)
    runner = llm.engine.runner
    assert runner.dtype == torch.bfloat16
    assert runner.model.model.layers[0].mlp.down_proj.weight.numel() == 0  # int8 replaced the plain matrix
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
    release(llm)


def test_seeded_sampling_is_reproducible_on_device(cuda_llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=16)
    a = cuda_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    b = cuda_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
