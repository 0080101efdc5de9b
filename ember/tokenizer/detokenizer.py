"""`IncrementalDetokenizer`: a request's output token ids in, newly finished text out, never half a character."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.tokenizer.tokenizer import Tokenizer

# Prompt tokens kept as left context: enough for a SentencePiece space or a split UTF-8 character.
_NUM_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes a growing list of ids by re-decoding a short window (vLLM's / TGI's prefix_offset and
    read_offset): text = decode(window) minus decode(window's already-read part). The window starts in
    the prompt, so a first token "▁Hello" after a text prompt gives " Hello".

    Once `flush()` is called, `text` == decode(prompt + output)[len(decode(prompt)):], which is
    decode(output) for byte-level BPE and for prompts ending in a special token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the window that is re-decoded
        self._read_offset = len(self._token_ids)  # ids before this are already in `text`
        self.text = ""  # all output text emitted so far

    def add(self, token_ids: list[int]) -> str:
        """Take new output ids; return the text they complete ("" while a character is still partial)."""
        self._token_ids.extend(token_ids)
        return self._advance(allow_partial=False)

    def flush(self) -> str:
        """At the end of a request: return whatever was held back, U+FFFD for an unfinished character."""
        return self._advance(allow_partial=True)

    def _advance(self, allow_partial: bool) -> str:
        decode = self._tokenizer.decode
        window = self._token_ids[self._prefix_offset:]
        read_text = decode(window[: self._read_offset - self._prefix_offset], self._skip_special_tokens)
        window_text = decode(window, self._skip_special_tokens)
        # A trailing U+FFFD is a UTF-8 character whose remaining bytes are in tokens still to come.
        if len(window_text) <= len(read_text) or (window_text.endswith("\ufffd") and not allow_partial):
            return ""
        new_text = window_text[len(read_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        self.text += new_text
        return new_text
