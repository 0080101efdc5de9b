"""`Tokenizer`: text ↔ token ids for one model, its special tokens and its chat template; built from a
Hugging Face tokenizer folder or from GGUF metadata."""
from __future__ import annotations

import functools
import json
import os

import tokenizers

from ember.tokenizer.chat_template import apply_chat_template
from ember.tokenizer.plain_content import PlainContentEncoder, encode_ids, map_strings
from ember.tokenizer.gguf_vocab import build_gguf_tokenizer

# Special tokens that end a turn or a document in common chat formats; generation stops at any of them
# that the vocabulary marks special, as llama.cpp does.
_END_OF_GENERATION_TOKENS = {
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "<|EOT|>", "<EOT>", "</s>", "<|return|>",
}


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; special tokens in text are always matched whole."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        extra_eos_token_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
        fim_token_ids: dict[str, int] | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        # "pre"/"suf"/"mid"/"pad"/"rep"/"sep" as the GGUF names them; empty: look FIM tokens up by spelling.
        self.fim_token_ids = dict(fim_token_ids or {})
        added = backend.get_added_tokens_decoder()
        self.all_special_ids = sorted(token_id for token_id, token in added.items() if token.special)
        self.eos_token_ids = {i for i in self.all_special_ids if added[i].content in _END_OF_GENERATION_TOKENS}
        self.eos_token_ids |= {i for i in (eos_token_id, *extra_eos_token_ids) if i is not None}

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """From a Hugging Face folder: tokenizer.json, plus tokenizer_config.json (special tokens, chat
        template), chat_template.jinja and generation_config.json (extra eos ids) when present.
        Adding BOS/EOS follows tokenizer.json's post-processor."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"No tokenizer.json in {path}")
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        generation = _read_json(os.path.join(path, "generation_config.json"))

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            return None if token is None else backend.token_to_id(token)

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            chat_template = {entry["name"]: entry["template"] for entry in chat_template}.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                chat_template = f.read()
        extra_eos = generation.get("eos_token_id") or ()
        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_id=token_id("eos_token"),
            pad_token_id=token_id("pad_token"),
            extra_eos_token_ids=tuple([extra_eos] if isinstance(extra_eos, int) else extra_eos),
            chat_template=chat_template,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        """From a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), as read by
        `ember.loader.read_gguf_metadata` or found in `Checkpoint.gguf_metadata`."""
        extra_eos = (metadata.get("tokenizer.ggml.eot_token_id"), metadata.get("tokenizer.ggml.eom_token_id"))
        return cls(
            build_gguf_tokenizer(metadata),
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
            extra_eos_token_ids=tuple(token_id for token_id in extra_eos if token_id is not None),
            chat_template=metadata.get("tokenizer.chat_template"),
            fim_token_ids=_gguf_fim_token_ids(metadata),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the BOS/EOS the model asks for (not the ones in
        the text: encode chat-template output with add_special_tokens=False). `parse_special=False` reads
        special-token spellings in the text as plain text (code an editor sends, say)."""
        return encode_ids(self.backend if parse_special else self._plain_backend, text, add_special_tokens)

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, tuple[int, int]]]:
        """(token id, (start, stop) character span in `text`) of each token; added BOS/EOS span nothing."""
        encoding = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return list(zip(encoding.ids, encoding.offsets))

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, parse_special_in_content: bool = False,
        chat_template: str | None = None, **extra,
    ) -> tuple[str, list[int]]:
        """(prompt text, token ids) of `messages` through the chat template. Special-token spellings inside the
        messages (and the `tools` given) are plain text unless `parse_special_in_content`: only the template
        makes control tokens, so a message cannot forge a turn."""
        if parse_special_in_content or not self._plain_content.is_needed:
            text = self.apply_chat_template(messages, add_generation_prompt, chat_template, **extra)
            return text, self.encode(text, add_special_tokens=False)

        def render(hide):
            guarded = {k: map_strings(v, hide) if k in ("tools", "documents") else v for k, v in extra.items()}
            return self.apply_chat_template(map_strings(messages, hide), add_generation_prompt, chat_template, **guarded)

        return self._plain_content.encode(render)

    @functools.cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    @functools.cached_property
    def _plain_content(self) -> PlainContentEncoder:
        return PlainContentEncoder(self.backend)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        """The vocabulary entries, as spelled there ("Ġthe", "▁the", "<0x0A>")."""
        return [self.backend.id_to_token(token_id) for token_id in token_ids]

    def token_text(self, token_id: int) -> str:
        """The text one token stands for, special tokens included, with its leading space (which a
        SentencePiece decode would drop at the start of text); may hold U+FFFD for part of a character."""
        text = self.decode([token_id], skip_special_tokens=False)
        if self.backend.id_to_token(token_id).startswith("▁") and not text.startswith(" "):
            text = " " + text
        return text

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None, **extra
    ) -> str:
        """The prompt text for `messages` with the model's template (or `chat_template`); see
        `ember.tokenizer.chat_template.apply_chat_template`."""
        return apply_chat_template(
            chat_template or self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.bos_token_id),
            eos_token=self._token(self.eos_token_id),
            **extra,
        )

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)


def _gguf_fim_token_ids(metadata: dict) -> dict[str, int]:
    # Older conversions store only prefix/suffix/middle, under other names.
    legacy = {"pre": "prefix", "suf": "suffix", "mid": "middle"}
    found = {}
    for key in ("pre", "suf", "mid", "pad", "rep", "sep"):
        token_id = metadata.get(f"tokenizer.ggml.fim_{key}_token_id")
        if token_id is None and key in legacy:
            token_id = metadata.get(f"tokenizer.ggml.{legacy[key]}_token_id")
        if token_id is not None:
            found[key] = int(token_id)
    return found


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
