"""Ember: a self-hosted LLM server. The offline API lives here: `LLM` and `SamplingParams`."""
__version__ = "0.1.0"

from ember.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from ember.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
