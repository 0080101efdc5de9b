"""The strict copy of a checkpoint tensor (or a GGUF file's blocks, which dequantize themselves) into a
parameter: shapes must match exactly. A leaf: the model families' loaders and the quant methods both use it."""
from __future__ import annotations

import torch


def check_shape(target: torch.Tensor, loaded) -> None:
    if tuple(loaded.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match expected {tuple(target.shape)}")


def copy_checked(target: torch.Tensor, loaded) -> None:
    """In-place copy (casting dtype, dequantizing blocks) that refuses a shape mismatch instead of broadcasting."""
    check_shape(target, loaded)
    target.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded.dequantize())
