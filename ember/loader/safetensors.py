"""Read a Hugging Face model folder: config.json and its safetensors weights, one file or sharded."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from tqdm import tqdm

_INDEX_FILE = "model.safetensors.index.json"


def load_hf_folder(path: str, dtype: torch.dtype, progress: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """`(hf_config, tensors)` of a folder holding config.json and *.safetensors; floating tensors cast to `dtype`.

    The config gets `rope_theta`/`rope_scaling` whether it spells them that way (transformers 4) or as
    `rope_parameters` (transformers 5). Raises ValueError/FileNotFoundError for missing weights or shards.
    """
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    files = _weight_files(path)
    keys = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys[file] = list(f.keys())

    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=sum(map(len, keys.values())), desc=f"Loading {os.path.basename(os.path.normpath(path))}",
               unit="tensor", disable=not progress)
    with bar:
        for file, names in keys.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    if name in tensors:
                        raise ValueError(f"Tensor {name!r} appears in more than one weight file of {path}")
                    tensor = f.get_tensor(name)
                    tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                    bar.update()
    _normalize_rope(hf_config)
    # An untied model saves lm_head; transformers leaves the key out of config.json when it is the default.
    hf_config.setdefault("tie_word_embeddings", "lm_head.weight" not in tensors)
    return hf_config, tensors


def _weight_files(path: str) -> list[str]:
    index_path = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [name for name in names if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shards that are not there: {', '.join(missing)}")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        names = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not names:
        raise ValueError(f"{path} has config.json but no *.safetensors weights (.bin checkpoints are not supported)")
    return [os.path.join(path, name) for name in names]


def _normalize_rope(hf_config: dict) -> None:
    rope = hf_config.pop("rope_parameters", None)
    if rope is not None:
        hf_config.setdefault("rope_theta", rope.get("rope_theta"))
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        hf_config["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    scaling = hf_config.get("rope_scaling")
    if scaling and "rope_type" not in scaling:  # older configs say "type"
        scaling["rope_type"] = scaling["type"]
    hf_config.setdefault("rope_theta", 10000.0)
    hf_config.setdefault("rope_scaling", None)
