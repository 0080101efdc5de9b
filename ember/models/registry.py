"""Architecture name (config.json "architectures") -> model class, imported only when asked for."""
import importlib

# architecture -> (module under ember.models, class name)
_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architectures: list[str]) -> type:
    """The class for the first supported name in `architectures`; ValueError listing the supported ones if none."""
    for arch in architectures or []:
        if arch in _MODELS:
            module, cls = _MODELS[arch]
            return getattr(importlib.import_module(f"ember.models.{module}"), cls)
    raise ValueError(
        f"unsupported architecture {architectures!r}; supported: {', '.join(supported_architectures())}"
    )
