"""Where the model runs: the device, dtype and weight quantization that "auto" resolves to."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """auto: the first GPU when PyTorch sees one, else the CPU. Asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "built for CUDA but sees no GPU"
        raise ValueError(f"--device {name}: this PyTorch ({torch.__version__}) is {build}; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: float32 on a CPU (this CPU path's fast kernels are float32 and int4/int8), bfloat16 on a GPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, quantized_c_kernels: bool,
                           triton: bool = False) -> torch.dtype:
    """The KV cache's element type. auto: float16 where the CPU path runs quantized weights on its C kernels
    (their outputs are already approximate; the cache then costs half the memory traffic), else the model's
    dtype, so the float paths stay exact against their references. Half caches need float32 activations; the
    GPU path's Triton kernels (`triton`) take the model's dtype only."""
    if name == "auto":
        return torch.float16 if quantized_c_kernels else model_dtype
    dtype = DTYPES[name]
    if triton and dtype != model_dtype:
        raise ValueError(f"kv_cache_dtype {name} runs on the CPU only; on a GPU use auto")
    if dtype != model_dtype and model_dtype != torch.float32:
        raise ValueError(f"kv_cache_dtype {name} needs float32 activations (the CPU path); this model runs in "
                         f"{str(model_dtype).removeprefix('torch.')}: use kv_cache_dtype auto")
    return dtype


def resolve_quantization(name: str, is_low_bit_checkpoint: bool, device: torch.device) -> str | None:
    """The weight-only copies to make: "int4", "int8" or None. auto quantizes a checkpoint that was stored in
    4 bits or fewer (its weights lose little more): int4 on a CPU, int8 on a GPU (the GPU kernel here)."""
    if name == "auto":
        if not is_low_bit_checkpoint:
            return None
        return "int8" if device.type == "cuda" else "int4"
    if name == "int4" and device.type == "cuda":
        raise ValueError("--quantize int4 runs on the CPU only; on a GPU use --quantize int8 (or none)")
    return None if name == "none" else name
