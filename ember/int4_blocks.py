"""`Int4Blocks`: a weight as it sits in a GGUF Q4_0 / Q4_1 file, w = d * q + m per block of 32 inputs.

The loader hands these to a Linear that builds its int4 kernel copy straight from them (a reshuffle of the
file's bytes); anything else dequantizes. A leaf: the loader and the layers both use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 32  # inputs per block


@dataclass
class Int4Blocks:
    qs: torch.Tensor  # uint8 [rows, cols / 32, 16]: byte j holds input j (low nibble) and input j + 16 (high)
    d: torch.Tensor  # float32 [rows, cols / 32]: the scale (a float16 value)
    m: torch.Tensor  # float32 [rows, cols / 32]: the offset (Q4_1's minimum; Q4_0's -8 d)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * BLOCK_SIZE

    def dequantize(self) -> torch.Tensor:  # [rows, cols] float32
        # q * d is exact in float32 (4 bits times a float16), so this equals gguf's d * (q - 8) for Q4_0 and
        # its d * q + m for Q4_1 bit for bit.
        q = torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1).float()  # [rows, cols / 32, 32]
        return q.mul_(self.d[..., None]).add_(self.m[..., None]).view(self.shape)

    @staticmethod
    def cat(parts: list[Int4Blocks]) -> Int4Blocks:
        """Row blocks stacked (a fused projection's shards)."""
        if len(parts) == 1:
            return parts[0]
        return Int4Blocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("qs", "d", "m")))
