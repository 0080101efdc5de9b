"""`load_checkpoint`: a GGUF file, a Hugging Face folder or a hub id → one `Checkpoint`
(an HF-style config and HF-named tensors)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from gguf import LlamaFileType

from ember.int4_blocks import Int4Blocks
from ember.loader.gguf import load_gguf
from ember.loader.hub import resolve_model_path
from ember.loader.safetensors import load_hf_folder

_GGUF_MAGIC = b"GGUF"


@dataclass
class Checkpoint:
    path: str  # resolved local path: the .gguf file or the HF folder
    format: str  # "gguf" | "hf"
    hf_config: dict  # config.json-style, HF key names (rope_theta and rope_scaling always present)
    tensors: dict[str, torch.Tensor | Int4Blocks]  # HF parameter names; lm_head.weight only when the checkpoint has it
    gguf_metadata: dict | None  # GGUF: every metadata field as plain Python values; HF: None

    @property
    def is_low_bit(self) -> bool:
        """A GGUF file whose layers are stored in 4 bits or fewer (Q4_*, Q3_*, Q2_*, IQ1-4): its float
        weights were dequantized from that, so int4 copies add little or no error."""
        file_type = (self.gguf_metadata or {}).get("general.file_type")
        if file_type is None:
            return False
        try:
            name = LlamaFileType(int(file_type)).name
        except ValueError:
            return False
        return any(kind in name for kind in ("Q4", "Q3", "Q2", "IQ1", "IQ2", "IQ3", "IQ4"))


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, progress: bool = True,
                    int4_blocks: bool = False) -> Checkpoint:
    """Load every weight of a model, dequantized to `dtype`, with its HF-style config; with `int4_blocks`,
    a GGUF file's Q4_0 / Q4_1 matrices stay `Int4Blocks` (the model's loaders dequantize what they do not keep).

    `path` is a .gguf file, a folder with config.json and *.safetensors (sharded or not), or a
    Hugging Face hub id. Raises FileNotFoundError for a path that does not exist, ValueError for
    something that is not a model or an unsupported GGUF architecture.
    """
    local = os.path.abspath(resolve_model_path(path))
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ValueError(
                f"{local} is not a model folder: expected config.json and *.safetensors weights (or give a .gguf file)"
            )
        hf_config, tensors = load_hf_folder(local, dtype, progress)
        return Checkpoint(local, "hf", hf_config, tensors, None)
    with open(local, "rb") as f:
        is_gguf = f.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC
    if not is_gguf:
        raise ValueError(
            f"{local} is not a model: expected a .gguf file or a folder with config.json and *.safetensors weights"
        )
    hf_config, tensors, metadata = load_gguf(local, dtype, progress, int4_blocks)
    return Checkpoint(local, "gguf", hf_config, tensors, metadata)
