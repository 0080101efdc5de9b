"""Weight loading: GGUF files, Hugging Face safetensors folders and hub ids, all returned under Hugging Face names."""
from ember.loader.checkpoint import Checkpoint, load_checkpoint
from ember.loader.gguf import read_gguf_metadata
from ember.loader.gguf_config import SUPPORTED_ARCHITECTURES
from ember.loader.hub import embedded_model_path, resolve_model_path

__all__ = [
    "Checkpoint",
    "SUPPORTED_ARCHITECTURES",
    "embedded_model_path",
    "load_checkpoint",
    "read_gguf_metadata",
    "resolve_model_path",
]
