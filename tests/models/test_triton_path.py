"""The GPU path's model (every layer on its Triton kernel, the batch as PackedAttentionMetadata) against Hugging
Face transformers on the tiny random models of test_llama_vs_hf, through the paged KV cache.

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), on the CPU in
float32: the same tolerance as the torch path (atol = rtol = 1e-4 on logits).
"""
import pytest
import torch

pytest.importorskip("triton")

from test_llama_vs_hf import (BLOCK_SIZE, CASES, NUM_BLOCKS, PROMPT_LEN, PagedCache, build_ember, build_hf,  # noqa: E402
                              hf_logits, prompt)

from ember.backends import select_backends  # noqa: E402
from ember.backends.attention_metadata import PackedAttentionMetadata  # noqa: E402

ATOL = RTOL = 1e-4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_triton(case: str, dtype: torch.dtype = torch.float32, quantize: str | None = None):
    hf, hf_config = build_hf(case)
    backends = select_backends(device=DEVICE, dtype=dtype, quantize=quantize, batch_invariant=False, use_triton=True,
                               kernels=None, int8_activations=False)
    return hf, build_ember(hf, hf_config, dtype=dtype, backends=backends, device=DEVICE)


class PackedPagedCache(PagedCache):
    """test_llama_vs_hf's PagedCache with the GPU path's metadata, on DEVICE."""

    def __init__(self, model, seed: int = 0):
        super().__init__(model, seed, DEVICE)

    def metadata(self, slots, query_start_loc, seq_lens, tables) -> PackedAttentionMetadata:
        return PackedAttentionMetadata.build(slots, query_start_loc, seq_lens, tables, DEVICE)


@pytest.mark.parametrize("case", CASES)
def test_chunked_prefill_and_decode_match_hf(case):
    hf, model = build_triton(case)
    tokens = prompt(PROMPT_LEN, seed=2)
    expected = hf_logits(hf, tokens)
    cache = PackedPagedCache(model)
    hidden = [cache.step([(0, tokens[:7])]), cache.step([(0, tokens[7:-3])])]  # the 2nd chunk reads the 1st from the cache
    hidden += [cache.step([(0, [t])]) for t in tokens[-3:]]  # decodes
    logits = model.compute_logits(torch.cat(hidden)).cpu()
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_mixed_batch_matches_each_sequence_alone():
    """Prefills, a chunk after a cached prefix and decodes in one launch give each sequence's own logits."""
    hf, model = build_triton("llama")
    prompts = [prompt(n, seed=10 + n) for n in (5, 11, 17)]
    steps = [[(i, p) for i, p in enumerate(prompts)], [(0, [7]), (1, [3, 1, 4, 1, 5, 9]), (2, [8])]]
    steps += [[(i, [20 + 3 * k + i]) for i in range(3)] for k in range(2)]
    cache = PackedPagedCache(model)
    batched = [(cache.step(chunks), chunks) for chunks in steps]
    for i in range(3):
        tokens = [t for chunks in steps for t in chunks[i][1]]
        rows = []
        for hidden, chunks in batched:
            start = sum(len(c[1]) for c in chunks[:i])
            rows.append(hidden[start:start + len(chunks[i][1])])
        torch.testing.assert_close(model.compute_logits(torch.cat(rows)).cpu(), hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


def test_int8_weights_equal_dense_on_the_dequantized_weights():
    """--quantize int8 on the GPU path: every linear and the (untied) head on the Triton int8 kernel give the
    torch path's logits on the same int8 weights dequantized (q * scale) into a float model."""
    hf, dense_model = build_triton("llama")
    _, model = build_triton("llama", quantize="int8")
    reference = build_ember(hf, build_hf("llama")[1])  # the torch path, on the CPU
    tokens = prompt(PROMPT_LEN, seed=5)
    dense = dense_model.compute_logits(PackedPagedCache(dense_model).step([(0, tokens)])).cpu()
    for module, ref_module in zip(model.modules(), reference.modules()):
        if getattr(module, "quantized", None) is not None:
            int8 = module.quantized
            ref_module.weight.data = (int8.weight.float() * int8.scales[:, None]).cpu()
    assert model.model.layers[0].mlp.down_proj.weight.numel() == 0  # the int8 copy replaced the plain matrix
    quantized = model.compute_logits(PackedPagedCache(model).step([(0, tokens)])).cpu()
    expected = reference.compute_logits(PagedCache(reference).step([(0, tokens)]))
    torch.testing.assert_close(quantized, expected, atol=ATOL, rtol=RTOL)
    assert (quantized - dense).abs().max() > 1e-3  # int8 did change the weights


def test_runner_on_the_gpu_path_generates_as_the_cpu_path():
    """ModelRunner.execute with use_triton (packed metadata through pinned copies, the sampler on the model's
    device) gives the CPU path's greedy tokens over a batch of prefills then decodes."""
    from ember.config import EngineConfig
    from ember.engine.scheduler_output import ScheduledRequest, SchedulerOutput
    from ember.runner.model_runner import ModelRunner
    from ember.sampling_params import SamplingParams

    hf, hf_config = build_hf("llama")
    config = EngineConfig.from_flat(device=DEVICE.type, dtype="float32", num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                    enforce_eager=True)
    tokens = {}
    for use_triton in (False, True):
        runner = ModelRunner(config, hf_config, dict(hf.state_dict()), eos_token_ids=set(), use_triton=use_triton)
        assert (runner.backends.kernel_variant == "triton") == use_triton
        prompts = {"a": prompt(9, seed=1), "b": prompt(14, seed=2)}
        blocks = {"a": [3, 17, 5, 30, 8, 12], "b": [40, 2, 21, 9, 33, 6, 14]}
        generated = {i: [] for i in prompts}
        step = [(i, p, 0) for i, p in prompts.items()]
        for _ in range(6):
            scheduled = [ScheduledRequest(i, ids, start, blocks[i], True, SamplingParams(temperature=0), prompts[i], generated[i])
                         for i, ids, start in step]
            sampled = runner.execute(SchedulerOutput(requests=scheduled))
            for i, _, _ in step:
                generated[i].append(sampled[i][0].token_id)
            step = [(i, [generated[i][-1]], len(prompts[i]) + len(generated[i]) - 1) for i in prompts]
        tokens[use_triton] = generated
    assert tokens[True] == tokens[False]
