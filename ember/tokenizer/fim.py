"""Fill-in-the-middle prompts: the FIM template a tokenizer's special tokens reveal (never the model's name),
and the token ids of a prefix/suffix request with optional repository context, laid out as llama.cpp's
/infill does."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.tokenizer.tokenizer import Tokenizer

# llama.cpp's separator before each extra file when the model has no file-separator token.
_SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"


@dataclass(frozen=True)
class FimTemplate:
    """How one model family is prompted to fill a hole; `render` gives the prompt's token ids."""

    family: str  # starcoder, santacoder, codellama, deepseek, qwen, codegemma, codestral, or gguf (ids only)
    prefix_id: int
    suffix_id: int
    middle_id: int | None  # None: Codestral, whose answer follows [PREFIX]{prefix} directly
    suffix_first: bool = False  # SPM order (Codestral): [SUFFIX]{suffix}[PREFIX]{prefix}
    file_sep_id: int | None = None
    repo_name_id: int | None = None
    # Tokens that end a FIM answer besides the tokenizer's eos ids: fim pad, EOT, file separator, ...
    stop_token_ids: frozenset[int] = frozenset()

    def render(
        self,
        tokenizer: Tokenizer,
        prefix: str,
        suffix: str,
        extra_files: Sequence[tuple[str, str]] = (),
        filename: str | None = None,
        repo_name: str = "myproject",
        parse_special: bool = False,
    ) -> list[int]:
        """[bos] + repository context + FIM part. `extra_files` are (filename, text) pairs of other files;
        with a file separator they and `filename` become `[sep]name\\n text` sections after `[repo]repo_name\\n`,
        without one each file's text follows llama.cpp's snippet separator. The template's own tokens go
        in by id; each text piece is encoded on its own, special-token spellings in it as plain text unless
        `parse_special` (code may hold `<|endoftext|>` and the like)."""

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False, parse_special=parse_special) if text else []

        token_ids = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        if self.file_sep_id is None:
            for _, text in extra_files:
                token_ids += encode(_SNIPPET_SEPARATOR) + encode(text)
        elif extra_files or filename:  # without context: plain FIM, no file separators at all
            if self.repo_name_id is not None:
                token_ids += [self.repo_name_id] + encode(repo_name + "\n")
            for name, text in extra_files:
                token_ids += [self.file_sep_id] + encode(name + "\n") + encode(text)
            token_ids += [self.file_sep_id] + encode((filename or "") + "\n")
        prefix_part = [self.prefix_id] + encode(prefix)
        suffix_part = [self.suffix_id] + encode(suffix)
        token_ids += suffix_part + prefix_part if self.suffix_first else prefix_part + suffix_part
        if self.middle_id is not None:
            token_ids.append(self.middle_id)
        return token_ids


@dataclass(frozen=True)
class _Family:
    name: str
    prefixes: tuple[str, ...]  # accepted spellings, first found wins
    suffixes: tuple[str, ...]
    middles: tuple[str, ...]  # empty: no middle token
    file_sep: str | None = None
    repo_name: str | None = None
    stops: tuple[str, ...] = ()
    suffix_first: bool = False
    needs_file_sep: bool = False  # the separator is what tells this family from one with the same FIM tokens


# Checked in order: CodeGemma and Qwen share the <|fim_*|> spellings and differ in their file separator.
_FAMILIES = (
    _Family(
        "codegemma", ("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",), file_sep="<|file_separator|>",
        needs_file_sep=True,
        # its model card stops on any FIM token as well as on the file separator
        stops=("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"),
    ),
    _Family(
        "qwen", ("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",), file_sep="<|file_sep|>",
        repo_name="<|repo_name|>", stops=("<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|endoftext|>"),
    ),
    _Family(
        "starcoder", ("<fim_prefix>",), ("<fim_suffix>",), ("<fim_middle>",), file_sep="<file_sep>",
        repo_name="<repo_name>", stops=("<fim_pad>", "<repo_name>", "<file_sep>", "<|endoftext|>"),
    ),
    _Family(
        "santacoder", ("<fim-prefix>",), ("<fim-suffix>",), ("<fim-middle>",), stops=("<fim-pad>", "<|endoftext|>")
    ),
    _Family(
        "codellama", ("▁<PRE>", "<PRE>"), ("▁<SUF>", "<SUF>"), ("▁<MID>", "<MID>"), stops=("▁<EOT>", "<EOT>")
    ),
    _Family("deepseek", ("<｜fim▁begin｜>",), ("<｜fim▁hole｜>",), ("<｜fim▁end｜>",), stops=("<|EOT|>",)),
    # Mistral's [MIDDLE] exists in its vocabulary but is not part of the prompt.
    _Family("codestral", ("[PREFIX]",), ("[SUFFIX]",), (), suffix_first=True),
)


def detect_fim_template(tokenizer: Tokenizer) -> FimTemplate | None:
    """The FIM template of `tokenizer`: from GGUF's fim_* token ids when the file names prefix, suffix and
    middle (the family then comes from the prefix token's spelling, else "gguf"), otherwise from the
    vocabulary's spellings. None when the model has no FIM tokens."""
    vocab = tokenizer.get_vocab()
    gguf_ids = tokenizer.fim_token_ids
    if all(key in gguf_ids for key in ("pre", "suf", "mid")):
        (prefix_token,) = tokenizer.convert_ids_to_tokens([gguf_ids["pre"]])
        family = next((f for f in _FAMILIES if prefix_token in f.prefixes and _find(vocab, f)), None)
        from_vocab = _template(family, vocab) if family else None
        # llama.cpp ends generation at the fim pad, repo and separator tokens.
        stop_ids = {gguf_ids[key] for key in ("pad", "rep", "sep") if key in gguf_ids}
        return FimTemplate(
            family=family.name if family else "gguf",
            prefix_id=gguf_ids["pre"],
            suffix_id=gguf_ids["suf"],
            middle_id=None if family and not family.middles else gguf_ids["mid"],
            suffix_first=family.suffix_first if family else False,
            file_sep_id=gguf_ids.get("sep", from_vocab.file_sep_id if from_vocab else None),
            repo_name_id=gguf_ids.get("rep", from_vocab.repo_name_id if from_vocab else None),
            stop_token_ids=frozenset(stop_ids | (from_vocab.stop_token_ids if from_vocab else set())),
        )
    family = next((f for f in _FAMILIES if _find(vocab, f)), None)
    return _template(family, vocab) if family else None


def _find(vocab: dict[str, int], family: _Family) -> tuple[int, int, int | None] | None:
    """The family's prefix, suffix and middle ids, or None when the vocabulary lacks one it needs."""

    def first(spellings: tuple[str, ...]) -> int | None:
        return next((vocab[s] for s in spellings if s in vocab), None)

    prefix_id, suffix_id, middle_id = first(family.prefixes), first(family.suffixes), first(family.middles)
    if prefix_id is None or suffix_id is None or (family.middles and middle_id is None):
        return None
    if family.needs_file_sep and family.file_sep not in vocab:
        return None
    return prefix_id, suffix_id, middle_id


def _template(family: _Family, vocab: dict[str, int]) -> FimTemplate:
    prefix_id, suffix_id, middle_id = _find(vocab, family)
    return FimTemplate(
        family=family.name,
        prefix_id=prefix_id,
        suffix_id=suffix_id,
        middle_id=middle_id,
        suffix_first=family.suffix_first,
        file_sep_id=vocab.get(family.file_sep),
        repo_name_id=vocab.get(family.repo_name),
        stop_token_ids=frozenset(vocab[s] for s in family.stops if s in vocab),
    )


def _adds_bos(tokenizer: Tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer.encode("a")[:1] == [bos] and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]
