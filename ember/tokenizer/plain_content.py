"""Chat prompts in which only the template makes control tokens: special-token text that a message holds
(`<|im_end|>` typed or pasted by a user, or found in a tool's output) is tokenized as the plain text it is.

The messages' strings are rendered with each special-token spelling replaced by a placeholder; in the rendered
text the template's own special tokens are then swapped for markers, the placeholders back for their text,
and one encode of the whole text matches the markers (added to a copy of the vocabulary as tokens of their
own, then mapped to the real ids) while the original spellings stay text. One encode of the whole text, not
one per piece, keeps the tokenizer's own handling of the text around special tokens (a SentencePiece dummy
prefix, say) exactly as for the unguarded prompt.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import tokenizers

# Markers and placeholders are Plane 16 private-use characters (U+100000-U+10FFFD): no text a model is trained
# on uses them, and no icon font does either (Nerd Fonts use Plane 15). The few a message might hold become U+FFFD.
_MARKER_BASE = 0x100000
_PLACEHOLDER_BASE = 0x108000
_PLANE_16 = re.compile("[\U00100000-\U0010FFFF]")
_SHORT_TEXT_CHARS = 4096  # encode_batch costs a thread hand-off; below this, encode is quicker and its GIL hold short


class PlainContentEncoder:
    def __init__(self, backend: tokenizers.Tokenizer):
        added = {token.content: (token_id, token) for token_id, token in backend.get_added_tokens_decoder().items()
                 if token.special}
        spellings = sorted(added, key=len, reverse=True)  # the longest spelling wins where two overlap
        self._special = re.compile("|".join(map(re.escape, spellings))) if spellings else None
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend.encode_special_tokens = True  # special spellings in the text are text
        self._marker = {s: chr(_MARKER_BASE + i) for i, s in enumerate(spellings)}
        self._backend.add_tokens([
            tokenizers.AddedToken(self._marker[s], single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                  normalized=False, special=False)
            for s, (_, t) in added.items()
        ])
        self._real_id = {self._backend.token_to_id(self._marker[s]): token_id for s, (token_id, _) in added.items()}

    @property
    def is_needed(self) -> bool:
        return self._special is not None

    def encode(self, render: Callable[[Callable[[str], str]], str]) -> tuple[str, list[int]]:
        """(text, token ids) of `render(hide)`: a renderer that passes every string it takes from the messages
        through `hide` before the template sees it."""
        hidden: dict[str, str] = {}  # spelling -> the placeholder that stands for it

        def hide(text: str) -> str:
            text = _PLANE_16.sub("\ufffd", text)
            return self._special.sub(lambda m: hidden.setdefault(m.group(), chr(_PLACEHOLDER_BASE + len(hidden))), text)

        rendered = render(hide)
        text = _restore(rendered, hidden)
        marked = self._special.sub(lambda m: self._marker[m.group()], rendered)
        ids = encode_ids(self._backend, _restore(marked, hidden), add_special_tokens=False)
        return text, [self._real_id.get(token_id, token_id) for token_id in ids]


def encode_ids(backend: tokenizers.Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`backend.encode(text).ids`. A long text goes through encode_batch, which lets go of the GIL while it
    works (encode holds it: a 1 MB text stalled the server's event loop for half a second)."""
    if len(text) <= _SHORT_TEXT_CHARS:
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def _restore(text: str, hidden: dict[str, str]) -> str:
    for spelling, placeholder in hidden.items():
        text = text.replace(placeholder, spelling)
    return text


def map_strings(value, fn: Callable[[str], str], skip_keys: frozenset[str] = frozenset({"role", "type"})):
    """`value` (messages, tools: JSON-like) with `fn` applied to every string, dict keys and `skip_keys` values aside."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_strings(item, fn, skip_keys) for item in value]
    if isinstance(value, dict):
        return {k: v if k in skip_keys else map_strings(v, fn, skip_keys) for k, v in value.items()}
    return value
