"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3): one implementation, HF parameter names.

Fused projections: q/k/v_proj load into `qkv_proj`, gate/up_proj into `gate_up_proj`.
"""
from __future__ import annotations

import torch
from torch import nn

from ember.int4_blocks import Int4Blocks
from typing import TYPE_CHECKING

from ember.layers.activation import SiluAndMul
from ember.layers.attention import Attention
from ember.layers.embedding import LMHead, VocabEmbedding
from ember.layers.linear import Linear
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.weight_copy import copy_checked

if TYPE_CHECKING:  # the runner hands the model its backends; the model only passes them to its layers
    from ember.backends import Backends
    from ember.backends.attention_metadata import AttentionMetadata

# fused parameter's module name -> the HF module names it stacks, in order
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
# HF buffers some checkpoints carry; recomputed here, so they are skipped rather than unexpected
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: dict, rotary_emb: RotaryEmbedding, sliding_window: int | None, qkv_bias: bool,
                 use_qk_norm: bool, dtype: torch.dtype, backends: Backends):
        super().__init__()
        hidden_size = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = cfg.get("head_dim") or hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        o_bias = cfg.get("attention_bias", False)  # Qwen2's q/k/v bias comes without an o_proj bias
        self.qkv_proj = Linear(hidden_size, [self.q_size, self.kv_size, self.kv_size], qkv_bias, dtype, backends.linear)
        self.o_proj = Linear(self.q_size, [hidden_size], o_bias, dtype, backends.linear)
        self.rotary_emb = rotary_emb  # shared by all layers
        self.q_norm = self.k_norm = None
        if use_qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-6), dtype, backends.pointwise)
            self.k_norm = RMSNorm(self.head_dim, cfg.get("rms_norm_eps", 1e-6), dtype, backends.pointwise)
        self.attn = Attention(self.head_dim**-0.5, sliding_window, backends.attention)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q, k, v, kv_cache, attn_metadata)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: dict, dtype: torch.dtype, backends: Backends):
        super().__init__()
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        hidden_size, intermediate_size, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("mlp_bias", False)
        self.gate_up_proj = Linear(hidden_size, [intermediate_size] * 2, bias, dtype, backends.linear)
        self.down_proj = Linear(intermediate_size, [hidden_size], bias, dtype, backends.linear)
        self.act_fn = SiluAndMul(backends.pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden_size]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: dict, rotary_emb: RotaryEmbedding, sliding_window: int | None, qkv_bias: bool,
                 use_qk_norm: bool, dtype: torch.dtype, backends: Backends):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, rotary_emb, sliding_window, qkv_bias, use_qk_norm, dtype, backends)
        self.mlp = LlamaMLP(cfg, dtype, backends)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype, backends.pointwise)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype, backends.pointwise)

    def forward(self, positions, hidden_states, residual, kv_cache, attn_metadata):
        # The residual add is fused into the next norm: (hidden, residual) flow between layers.
        if residual is None:
            hidden_states, residual = self.input_layernorm(hidden_states), hidden_states
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: dict, qkv_bias: bool, use_qk_norm: bool, dtype: torch.dtype, backends: Backends):
        super().__init__()
        num_layers = cfg["num_hidden_layers"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        base, scaling = _rope_params(cfg)
        rotary_emb = RotaryEmbedding(head_dim, cfg["max_position_embeddings"], base, scaling, backends.pointwise)
        self.embed_tokens = VocabEmbedding(cfg["vocab_size"], cfg["hidden_size"], dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary_emb, window, qkv_bias, use_qk_norm, dtype, backends)
            for window in _sliding_windows(cfg, num_layers)
        )
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6), dtype, backends.pointwise)
        self.fused_decode = backends.fused_decode  # the fused decode path of the backend, if it has one
        self.fused_layers = None  # set by process_weights_after_loading when every layer qualifies

    def process_weights_after_loading(self) -> None:
        if self.fused_decode is not None:
            self.fused_layers = self.fused_decode.fuse(self.layers)

    def forward(self, input_ids, positions, kv_caches, attn_metadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        fused = self.fused_layers and self.fused_layers.forward(positions, attn_metadata, kv_caches, hidden_states)
        if fused:
            hidden_states, residual = fused
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """Contract with the runner: forward over a flattened ragged batch, then logits for the rows it picks.

    The runner allocates one KV tensor per layer of shape `kv_cache_shape(num_blocks, block_size)` in the
    model dtype; a token costs 2 * num_layers * num_kv_heads * head_dim * itemsize bytes of cache.
    `backends` (ember.backends.select_backends) says how every layer computes.
    """

    default_qkv_bias = False  # q/k/v bias when the config has no "attention_bias"
    use_qk_norm = False

    def __init__(self, hf_config: dict, dtype: torch.dtype, backends: Backends):
        super().__init__()
        cfg = hf_config
        qkv_bias = cfg.get("attention_bias", self.default_qkv_bias)
        self.dtype = dtype
        self.num_layers = cfg["num_hidden_layers"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.vocab_size = cfg["vocab_size"]
        self.max_position_embeddings = cfg["max_position_embeddings"]
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", False)
        self.model = LlamaModel(cfg, qkv_bias, self.use_qk_norm, dtype, backends)
        tied_to = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(cfg["hidden_size"], self.vocab_size, dtype, backends.lm_head, tied_to)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)  # K at index 0, V at 1

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],  # num_layers x [2, num_blocks, block_size, num_kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [num_seqs, hidden] -> [num_seqs, vocab]
        return self.lm_head(hidden_states)

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strict load from HF names: every tensor used, every parameter filled, shapes checked."""
        expected = self._hf_names()  # HF key -> (our parameter name, shard id or None)
        params = dict(self.named_parameters())
        unexpected, loaded = [], set()
        for key, tensor in tensors.items():
            if key.endswith(IGNORED_SUFFIXES) or (key == "lm_head.weight" and self.tie_word_embeddings):
                continue
            if key not in expected:
                unexpected.append(key)
                continue
            name, shard_id = expected[key]
            param = params[name]
            try:
                getattr(param, "weight_loader", _default_loader)(param, tensor, shard_id)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
            loaded.add(key)
        missing = sorted(set(expected) - loaded)
        if missing or unexpected:
            raise ValueError(f"weights do not match the model: missing {_few(missing)}; unexpected {_few(unexpected)}")
        head = tensors.get("lm_head.weight")
        if isinstance(head, Int4Blocks):
            head = head.dequantize()
        if self.tie_word_embeddings and head is not None and not torch.equal(head.to(self.lm_head.weight.device, self.dtype), self.lm_head.weight):
            raise ValueError("tie_word_embeddings is set but lm_head.weight differs from model.embed_tokens.weight")

    def _hf_names(self) -> dict[str, tuple[str, int | None]]:
        names = {}
        for name in dict(self.named_parameters()):  # a tied lm_head.weight is deduplicated away here
            *prefix, module, leaf = name.split(".")
            for shard_id, hf_module in enumerate(PACKED_MODULES.get(module, [])):
                names[".".join([*prefix, hf_module, leaf])] = (name, shard_id)
            if module not in PACKED_MODULES:
                names[name] = (name, None)
        return names


class MistralForCausalLM(LlamaForCausalLM):
    pass  # same math; its sliding window comes from the config


class Qwen2ForCausalLM(LlamaForCausalLM):
    default_qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    use_qk_norm = True


def _default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: None) -> None:
    copy_checked(param.data, loaded)


def _few(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _rope_params(cfg: dict) -> tuple[float, dict]:
    """(theta, scaling) from either layout: transformers>=5 `rope_parameters`, or `rope_theta` + `rope_scaling`."""
    scaling = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    base = scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        original = cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"])
        scaling.setdefault("original_max_position_embeddings", original)
    return base, scaling


def _sliding_windows(cfg: dict, num_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), following HF's Mistral / Qwen2 / Qwen3 configs."""
    window = cfg.get("sliding_window")
    if cfg.get("layer_types"):
        unknown = set(cfg["layer_types"]) - {"full_attention", "sliding_attention"}
        if unknown:
            raise NotImplementedError(f"layer_types {sorted(unknown)} are not supported")
        return [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
    if "use_sliding_window" in cfg:  # Qwen: a window only when enabled, and only from max_window_layers on
        use = cfg["use_sliding_window"] and window is not None
        return [window if use and i >= cfg.get("max_window_layers", 0) else None for i in range(num_layers)]
    return [window] * num_layers
