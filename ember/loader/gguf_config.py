"""GGUF metadata (llama.cpp key names) → a Hugging Face config.json-style dict."""
from __future__ import annotations

import math

import numpy as np

# GGUF `general.architecture` → HF class. llama.cpp converts Mistral and SmolLM to "llama".
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_to_hf_config(
    metadata: dict, tensor_names: set[str], vocab_size: int, rope_factors: np.ndarray | None = None
) -> dict:
    """The HF config of a GGUF model.

    `tensor_names` are the GGUF tensor names (ties and biases are read off them), `vocab_size` the
    embedding's row count, `rope_factors` the `rope_freqs.weight` tensor if the file has one.
    Raises ValueError for an architecture outside SUPPORTED_ARCHITECTURES.
    """
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            " (llama covers Llama, Mistral and SmolLM files)"
        )

    def get(key: str, default=None):
        return metadata.get(f"{arch}.{key}", default)

    num_heads = get("attention.head_count")
    hidden_size = get("embedding_length")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden_size // num_heads
    rope_theta = float(get("rope.freq_base", 10000.0))
    if rope_factors is not None:
        rope_scaling = _llama3_rope_scaling(rope_factors, rope_theta, head_dim)
    else:
        rope_scaling = _rope_scaling(get)
    return {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def _rope_scaling(get) -> dict | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
    if (original := get("rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = original
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if (value := get(f"rope.scaling.{gguf_key}")) is not None:
            scaling[hf_key] = float(value)
    return scaling


def llama3_rope_factors(
    rope_theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """The per-frequency divisors llama.cpp's convert_hf_to_gguf.py writes as `rope_freqs.weight` for llama3 scaling."""
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth_factors = 1 / ((1 - smooth) / factor + smooth)
    high_wavelen = original_max_position_embeddings / high_freq_factor
    low_wavelen = original_max_position_embeddings / low_freq_factor
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, smooth_factors))


def _llama3_rope_scaling(rope_factors: np.ndarray, rope_theta: float, head_dim: int) -> dict | None:
    """HF llama3 rope parameters recovered from `rope_freqs.weight`, which stores divisors, not parameters.

    factor is the largest divisor. In the smooth band 1/divisor = (1-s)/factor + s, with s linear in
    1/wavelen: s = (L/wavelen - low) / (high - low). One line cannot give three unknowns, so we take
    Meta's low_freq_factor = 1 (every Llama 3.x) and solve for high and L; the result is checked by
    recomputing the divisors.
    """
    divisors = np.asarray(rope_factors, dtype=np.float64)
    factor = float(divisors.max())
    if factor <= 1.0 + 1e-6:
        return None
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    band = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    high_freq_factor, original = 4.0, 8192.0  # Meta's values, for a band too narrow to fit
    if band.sum() >= 2:
        slope, intercept = np.polyfit(1 / wavelen[band], smooth[band], 1)
        high_freq_factor, original = 1 - 1 / intercept, -slope / intercept
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high_freq_factor), 3),
        "original_max_position_embeddings": int(round(original)),
    }
    params = {k: v for k, v in scaling.items() if k != "rope_type"}
    if not np.allclose(llama3_rope_factors(rope_theta, head_dim, **params), divisors, rtol=1e-3):
        raise ValueError("rope_freqs.weight does not follow llama3 rope scaling; cannot derive rope_scaling")
    return scaling
