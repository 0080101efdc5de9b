"""`dequantize`: GGUF tensor data → float32 torch tensor; Q4_0, Q4_1 and Q8_0 in vectorised torch, other
types through gguf's numpy `dequantize`. Both give the same bits (tests/unit/test_gguf_fast_read.py)."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize


def dequantize(data: np.ndarray, tensor_type: GGMLQuantizationType) -> torch.Tensor:
    """float32 weights of `data` ([rows, bytes per row] for quantized types, the values otherwise),
    [rows, cols] (or [cols]); a tensor that owns its memory, never a view of the file's memory map."""
    by_type = _TORCH_DEQUANTIZERS.get(tensor_type)
    if by_type is None:
        # gguf leaves F32 data a view of the read-only memory map: copy it, so every tensor owns its memory.
        return torch.from_numpy(np.require(gguf_dequantize(data, tensor_type), np.float32, ["C", "W"]))
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    *leading, row_bytes = data.shape
    blocks = torch.from_numpy(np.array(data, np.uint8)).view(-1, type_size)  # a copy: the map is read-only
    # gguf computes in float32 one operation at a time (no fused multiply-add); so does each function.
    weights = by_type(blocks)  # [num_blocks, block_size]
    return weights.view(*leading, row_bytes // type_size * block_size)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:  # [num_blocks, 1]: a float16 field as float32
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:  # [num_blocks, 16] bytes → [num_blocks, 32] in 0..15
    # ggml's order: a block's low nibbles are its first 16 weights, its high nibbles the last 16.
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


# In place after the first float tensor: a fresh full-size temporary per operation costs its page faults.
def _q4_0(blocks: torch.Tensor) -> torch.Tensor:  # 2-byte scale d, 16 bytes of nibbles q: w = d * (q - 8)
    return _nibbles(blocks[:, 2:]).float().sub_(8).mul_(_half(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:  # scale d, minimum m, 16 bytes of nibbles q: w = d * q + m
    return _nibbles(blocks[:, 4:]).float().mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:  # scale d, 32 int8 x: w = x * d
    return blocks[:, 2:].view(torch.int8).float().mul_(_half(blocks, 0))


_TORCH_DEQUANTIZERS = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
}
