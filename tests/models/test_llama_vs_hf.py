"""Ember's Llama-family models against Hugging Face transformers on tiny random models, through the paged KV cache.

Tolerance (float32): atol = rtol = 1e-4 on logits. Both sides compute the same math; only the summation order
differs (fused QKV / gate_up GEMMs, SDPA vs HF eager attention), which moves logits by ~1e-6. A real bug (wrong
mask offset, RoPE layout, GQA mapping, bias, norm) moves them by > 1e-2.
"""
import json

import pytest
import torch
import transformers

from ember.backends import reference_backends
from ember.backends.attention_metadata import AttentionMetadata
from ember.models.registry import get_model_class
from ember.runner.model_runner import build_model

ATOL = RTOL = 1e-4
BLOCK_SIZE = 4  # small, so a 20-token prompt spans several blocks
NUM_BLOCKS = 64
PROMPT_LEN = 20
NUM_NEW_TOKENS = 10

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # wavelengths of head_dim 16 fall in all three bands
CASES = {
    "llama": ("Llama", dict(tie_word_embeddings=False)),
    # SmolLM2 is exactly this: Llama with tied embeddings. Also checks the legacy rope_theta/rope_scaling keys.
    "llama3-rope-tied": ("Llama", dict(tie_word_embeddings=True,
                                       rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0))),
    "llama-linear-rope-bias": ("Llama", dict(attention_bias=True, mlp_bias=True,
                                             rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4))),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(head_dim=32)),  # head_dim from the config, not hidden_size / num_heads
    "mistral-sliding-window": ("Mistral", dict(sliding_window=8)),  # smaller than the prompt: the window matters
}


def build_hf(case: str, seed: int = 0):
    """A seeded tiny HF model in float32 with every parameter (biases and norms included) randomized."""
    family, overrides = CASES[case]
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    config = config_cls(**{**TINY, **overrides}, architectures=[f"{family}ForCausalLM"], attn_implementation="eager")
    torch.manual_seed(seed)
    hf = model_cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # HF initializes biases to 0 and norms to 1, which would hide a dropped bias or norm weight.
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    hf_config = json.loads(hf.config.to_json_string())  # what config.json holds
    if case == "llama3-rope-tied":  # the pre-transformers-5 layout of the same settings
        rope = hf_config.pop("rope_parameters")
        hf_config["rope_theta"] = rope.pop("rope_theta")
        hf_config["rope_scaling"] = rope
    return hf, hf_config


def build_ember(hf, hf_config: dict, batch_invariant: bool = False, dtype: torch.dtype = torch.float32, backends=None,
                device: str | torch.device = "cpu"):
    """Ember's model of the same weights on `backends` (default: the reference ones)."""
    return build_model(get_model_class(hf_config["architectures"]), hf_config, dict(hf.state_dict()), dtype,
                       backends or reference_backends(batch_invariant), device)


class PagedCache:
    """A minimal stand-in for the runner: shuffled block ids, one flattened step at a time."""

    def __init__(self, model, seed: int = 0, device: str | torch.device = "cpu", kv_dtype: torch.dtype | None = None):
        self.model = model
        self.device = device
        self.kv_caches = [torch.zeros(model.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE), dtype=kv_dtype or model.dtype,
                                      device=device) for _ in range(model.num_layers)]
        # Non-contiguous, out-of-order block ids: a sequence's blocks are scattered over the pool.
        self.free_blocks = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    @torch.no_grad()
    def step(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Runs (seq_id, new token ids) for every sequence in one flattened batch; returns [num_tokens, hidden]."""
        input_ids, positions, slots, query_start_loc, seq_lens, tables = [], [], [], [0], [], []
        for seq_id, token_ids in chunks:
            start = self.num_computed.get(seq_id, 0)
            seq_len = start + len(token_ids)
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * BLOCK_SIZE < seq_len:
                table.append(self.free_blocks.pop())
            input_ids += token_ids
            positions += range(start, seq_len)
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, seq_len)]
            query_start_loc.append(len(input_ids))
            seq_lens.append(seq_len)
            tables.append(list(table))
            self.num_computed[seq_id] = seq_len
        metadata = self.metadata(slots, query_start_loc, seq_lens, tables)
        ids, pos = torch.tensor(input_ids, device=self.device), torch.tensor(positions, device=self.device)
        return self.model(ids, pos, self.kv_caches, metadata)

    def metadata(self, slots, query_start_loc, seq_lens, tables) -> AttentionMetadata:
        return AttentionMetadata(torch.tensor(slots, device=self.device), query_start_loc, seq_lens, tables)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:  # [len(token_ids), vocab]
    return hf(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("case", CASES)
def test_prefill_in_one_step_matches_hf(case):
    hf, hf_config = build_hf(case)
    model = build_ember(hf, hf_config)
    tokens = prompt(PROMPT_LEN, seed=1)
    hidden = PagedCache(model).step([(0, tokens)])
    torch.testing.assert_close(model.compute_logits(hidden), hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", CASES)
def test_chunked_prefill_then_decode_matches_hf_greedy(case):
    hf, hf_config = build_hf(case)
    model = build_ember(hf, hf_config)
    tokens = prompt(PROMPT_LEN, seed=2)
    with torch.no_grad():
        generated = hf.generate(torch.tensor([tokens]), max_new_tokens=NUM_NEW_TOKENS, do_sample=False,
                                min_new_tokens=NUM_NEW_TOKENS)[0, PROMPT_LEN:].tolist()
    assert len(generated) == NUM_NEW_TOKENS
    expected = hf_logits(hf, tokens + generated[:-1])  # logits at every position, from one full HF forward

    cache = PagedCache(model)
    logits = [model.compute_logits(cache.step([(0, tokens[:7])])),  # chunk 1: positions 0..6
              model.compute_logits(cache.step([(0, tokens[7:])]))]  # chunk 2 attends to chunk 1 via the cache
    next_token = logits[-1][-1].argmax().item()
    ember_greedy = [next_token]
    for token in generated[:-1]:  # decode, fed HF's tokens so positions stay aligned even on a mismatch
        logits.append(model.compute_logits(cache.step([(0, [token])])))
        ember_greedy.append(logits[-1][-1].argmax().item())
    torch.testing.assert_close(torch.cat(logits), expected, atol=ATOL, rtol=RTOL)
    assert ember_greedy == generated


@pytest.mark.parametrize("case, dtype", [("llama", torch.float32), ("qwen3", torch.float32),
                                         ("mistral-sliding-window", torch.float32), ("llama", torch.bfloat16)])
def test_batch_matches_each_sequence_alone_bitwise(case, dtype):
    """A sequence's logits are bitwise the same whatever else shares its step (prefill, mixed, decode).

    Needs batch_invariant=True: a plain CPU GEMM (MKL/oneDNN) changes a row's result with the number of rows.
    """
    hf, hf_config = build_hf(case)
    model = build_ember(hf, hf_config, batch_invariant=True, dtype=dtype)
    prompts = [prompt(n, seed=10 + n) for n in (5, 11, 17)]
    # step 1: all three prompts; step 2: seq 0 and 2 decode while seq 1 prefills its next chunk; steps 3-5: decode
    steps = [[(i, p) for i, p in enumerate(prompts)], [(0, [7]), (1, [3, 1, 4, 1, 5, 9]), (2, [8])]]
    steps += [[(i, [20 + 3 * k + i]) for i in range(3)] for k in range(3)]

    batched, batched_cache = [], PagedCache(model, seed=0)
    for chunks in steps:
        hidden = batched_cache.step(chunks)
        ends = torch.tensor([len(c[1]) for c in chunks]).cumsum(0)
        batched.append((hidden, model.compute_logits(hidden[ends - 1]), ends))
    for i in range(3):
        alone_cache = PagedCache(model, seed=1 + i)  # other block ids too: placement must not matter either
        for (hidden, logits, ends), chunks in zip(batched, steps):
            alone = alone_cache.step([chunks[i]])
            start = 0 if i == 0 else ends[i - 1].item()
            assert torch.equal(alone, hidden[start:ends[i]]), f"seq {i}: hidden states differ in {chunks}"
            assert torch.equal(model.compute_logits(alone[-1:]), logits[i:i + 1]), f"seq {i}: logits differ"


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_is_as_accurate_as_hf_bfloat16(case):
    """In bfloat16 both drift from the float32 logits; Ember's drift stays within HF's own (x1.5 margin)."""
    hf, hf_config = build_hf(case)
    tokens = prompt(PROMPT_LEN, seed=4)
    reference = hf_logits(hf, tokens)
    model = build_ember(hf, hf_config, dtype=torch.bfloat16)
    ember_error = (model.compute_logits(PagedCache(model).step([(0, tokens)])) - reference).abs().max()
    hf_error = (hf_logits(hf.to(torch.bfloat16), tokens) - reference).abs().max()
    assert ember_error <= 1.5 * hf_error


def test_tied_lm_head_may_be_absent_from_checkpoint():
    hf, hf_config = build_hf("qwen2-tied")
    model = get_model_class(hf_config["architectures"])(hf_config, torch.float32, reference_backends())
    tensors = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # as safetensors stores it
    model.load_weights(tensors)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = prompt(PROMPT_LEN, seed=3)
    torch.testing.assert_close(model.compute_logits(PagedCache(model).step([(0, tokens)])), hf_logits(hf, tokens),
                               atol=ATOL, rtol=RTOL)


def test_loading_is_strict():
    hf, hf_config = build_hf("llama")
    model_cls = get_model_class(hf_config["architectures"])
    tensors = dict(hf.state_dict())

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.self_attn\.k_proj\.weight"):
        model_cls(hf_config, torch.float32, reference_backends()).load_weights(missing)

    with pytest.raises(ValueError, match=r"unexpected model\.layers\.0\.mlp\.extra_proj\.weight"):
        model_cls(hf_config, torch.float32, reference_backends()).load_weights({**tensors, "model.layers.0.mlp.extra_proj.weight": torch.zeros(1)})

    wrong_shape = {**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: checkpoint shape \(64, 64\)"):
        model_cls(hf_config, torch.float32, reference_backends()).load_weights(wrong_shape)

    # HF's recomputable rotary buffer is tolerated.
    model_cls(hf_config, torch.float32, reference_backends()).load_weights({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})


def test_tied_lm_head_must_equal_embedding():
    hf, hf_config = build_hf("qwen2-tied")
    tensors = {**hf.state_dict(), "lm_head.weight": torch.zeros(256, 64)}
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        get_model_class(hf_config["architectures"])(hf_config, torch.float32, reference_backends()).load_weights(tensors)


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM"):
        get_model_class(["GPT2LMHeadModel"])


def test_unsupported_rope_type_is_refused():
    _, hf_config = build_hf("llama")
    hf_config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(NotImplementedError, match="'yarn'.*supported: default, linear, llama3"):
        get_model_class(hf_config["architectures"])(hf_config, torch.float32, reference_backends())
