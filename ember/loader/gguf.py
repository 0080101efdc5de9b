"""Read a GGUF file: its metadata as plain Python values and its tensors under Hugging Face names, dequantized
(or, on request, Q4_0 / Q4_1 matrices kept as their blocks)."""
from __future__ import annotations

import os
import re

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor
from tqdm import tqdm

from ember.int4_blocks import Int4Blocks
from ember.loader import gguf_dequant
from ember.loader.gguf_config import gguf_to_hf_config
from ember.loader.gguf_reader import ArrayGGUFReader

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)")
# Not a parameter: llama3 rope scaling, turned into config["rope_scaling"].
_ROPE_FREQS = "rope_freqs.weight"


def read_gguf_metadata(path: str) -> dict:
    """Every metadata field of a GGUF file (str, int, float, bool or lists of them), tensors left unread."""
    return _metadata(ArrayGGUFReader(path))


def load_gguf(path: str, dtype: torch.dtype, progress: bool, int4_blocks: bool = False) -> tuple[dict, dict, dict]:
    """`(hf_config, tensors, metadata)` of a GGUF file, tensors dequantized to `dtype` under HF names;
    with `int4_blocks`, Q4_0 / Q4_1 matrices come as `Int4Blocks` instead (no float copy: start-up time).

    Raises ValueError for an unsupported architecture or a tensor with no HF counterpart.
    """
    reader = ArrayGGUFReader(path)
    metadata = _metadata(reader)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    rope_freqs = by_name.pop(_ROPE_FREQS, None)
    embedding = by_name.get("token_embd.weight")
    hf_config = gguf_to_hf_config(
        metadata,
        set(by_name),
        vocab_size=len(metadata.get("tokenizer.ggml.tokens", ())) if embedding is None else int(embedding.shape[-1]),
        rope_factors=None if rope_freqs is None else gguf_dequant.dequantize(rope_freqs.data, rope_freqs.tensor_type).numpy(),
    )
    # llama.cpp permutes Q and K rows of "llama" models only (convert_hf_to_gguf.py LlamaModel.permute).
    permuted_num_heads = {}
    if metadata["general.architecture"] == "llama":
        permuted_num_heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}

    tensors = {}
    bar = tqdm(by_name.values(), desc=f"Loading {os.path.basename(path)}", unit="tensor", disable=not progress)
    for tensor in bar:
        name, kind = hf_tensor_name(tensor.name)
        tensors[name] = _load_tensor(tensor, permuted_num_heads.get(kind), dtype, int4_blocks)
    return hf_config, tensors, metadata


def hf_tensor_name(gguf_name: str) -> tuple[str, str]:
    """`(hf_name, gguf_kind)` for a GGUF tensor name, e.g. "blk.3.attn_q.weight" →
    ("model.layers.3.self_attn.q_proj.weight", "attn_q"); ValueError for a tensor Ember has no place for."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}", base
    match = _LAYER_TENSOR.fullmatch(base)
    if match is None or match[2] not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in the supported architectures")
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{suffix}", match[2]


def _load_tensor(tensor: ReaderTensor, permuted_num_heads: int | None, dtype: torch.dtype,
                 int4_blocks: bool) -> torch.Tensor | Int4Blocks:
    # Un-permute before dequantizing: it moves whole rows and a row is whole quantization blocks, so the
    # raw rows can also be kept as they are (Int4Blocks).
    data = tensor.data  # [rows, bytes per row] for quantized types, [rows, cols] (or [cols]) otherwise
    if permuted_num_heads:
        data = _unpermute_rows(data, permuted_num_heads)
    if int4_blocks and tensor.tensor_type in _INT4_TYPES and data.ndim == 2:
        return _int4_blocks(data, tensor.tensor_type)
    weights = gguf_dequant.dequantize(data, tensor.tensor_type)  # [out_features, in_features]: GGUF lists dims reversed
    return weights.to(dtype)


_INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def _int4_blocks(data, tensor_type: GGMLQuantizationType) -> Int4Blocks:
    # Q4_0 block: float16 d, 16 bytes of nibbles (w = d * (q - 8)); Q4_1: float16 d, float16 m, nibbles.
    # Each field copied once out of the read-only map, as its own array.
    _, type_size = GGML_QUANT_SIZES[tensor_type]
    rows, row_bytes = data.shape
    blocks = data.reshape(rows, row_bytes // type_size, type_size)

    def half(start: int) -> torch.Tensor:  # [rows, blocks] float32
        return torch.from_numpy(blocks[..., start:start + 2].copy().view(np.float16)[..., 0]).float()

    d = half(0)
    if tensor_type == GGMLQuantizationType.Q4_0:
        return Int4Blocks(torch.from_numpy(blocks[..., 2:].copy()), d, d * -8)
    return Int4Blocks(torch.from_numpy(blocks[..., 4:].copy()), d, half(2))


def _unpermute_rows(data, num_heads: int):  # numpy array in, numpy array out
    # llama.cpp interleaves each head's two rotary halves row by row ([x0 y0 x1 y1 ...]) for its RoPE
    # kernel; HF's rotate_half wants them apart ([x0 x1 ... y0 y1 ...]).
    head_dim = data.shape[0] // num_heads
    return data.reshape(num_heads, head_dim // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _metadata(reader: ArrayGGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}
