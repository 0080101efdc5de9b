"""Rotary position embedding (HF "rotate_half" layout) with a cos/sin cache over every position.

Supported `rope_scaling` types: default, linear, llama3. Others (dynamic, yarn, longrope, ...) are refused:
dynamic NTK rescales by the current sequence length, which K already written to a shared cache cannot follow.
"""
import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RotaryEmbedding(nn.Module):
    """cos/sin of every position, applied to q and k by the pointwise backend."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None, pointwise):
        super().__init__()
        self.pointwise = pointwise
        inv_freq = rope_inv_freq(head_dim, base, scaling or {})  # [head_dim // 2]
        # Same float32 arithmetic as HF: positions * inv_freq, then cos / sin.
        freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq  # [max_position, head_dim // 2]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pointwise.rotary(positions, q, k, self.cos_cache, self.sin_cache)


def rope_inv_freq(head_dim: int, base: float, scaling: dict) -> torch.Tensor:  # [head_dim // 2] float32
    """Inverse frequencies for `scaling` (an HF rope_scaling / rope_parameters dict; empty means default)."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
