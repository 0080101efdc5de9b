"""Ember: a self-hosted LLM server. The offline API lives here: `LLM` and `SamplingParams`."""
__version__ = "0.1.0"
