"""The strict copy of a checkpoint tensor (or GGUF blocks) into a parameter: shapes must match exactly. A leaf:
the model families' loaders and the backends' quant methods both use it."""
from __future__ import annotations

import torch

from ember.int4_blocks import Int4Blocks


def check_shape(target: torch.Tensor, loaded: torch.Tensor | Int4Blocks) -> None:
    if tuple(loaded.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match expected {tuple(target.shape)}")


def copy_checked(target: torch.Tensor, loaded: torch.Tensor | Int4Blocks) -> None:
    """In-place copy (casting dtype, dequantizing blocks) that refuses a shape mismatch instead of broadcasting."""
    check_shape(target, loaded)
    target.copy_(loaded.dequantize() if isinstance(loaded, Int4Blocks) else loaded)
