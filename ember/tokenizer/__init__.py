"""Tokenization: encode/decode with special tokens, chat templates and UTF-8-safe incremental detokenization."""
from ember.tokenizer.chat_template import apply_chat_template
from ember.tokenizer.detokenizer import IncrementalDetokenizer
from ember.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "apply_chat_template"]
