"""Tokenization: encode/decode with special tokens, chat templates, fill-in-the-middle prompts and
UTF-8-safe incremental detokenization."""
from ember.tokenizer.chat_template import apply_chat_template
from ember.tokenizer.detokenizer import IncrementalDetokenizer
from ember.tokenizer.fim import FimTemplate, detect_fim_template
from ember.tokenizer.tokenizer import Tokenizer

__all__ = ["FimTemplate", "IncrementalDetokenizer", "Tokenizer", "apply_chat_template", "detect_fim_template"]
