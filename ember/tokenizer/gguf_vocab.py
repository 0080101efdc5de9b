"""Rebuild a `tokenizers.Tokenizer` from the vocabulary llama.cpp stores in GGUF metadata: byte-level BPE
("gpt2") or SentencePiece ("llama"), special tokens included, behaving as llama.cpp tokenizes."""
from __future__ import annotations

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` → the regexes llama.cpp splits text with before BPE (llama-vocab.cpp), applied in order.
# Names missing here get GPT-2's, as transformers does (llama.cpp itself refuses unknown names).
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["gpt2", "gpt-2", "default", "phi-2", "mpt", "olmo", "jais"], [_GPT2_SPLIT]),
    # digits one by one, then GPT-2: the Digits + ByteLevel pair of these models' tokenizer.json
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], [r"\p{N}", _GPT2_SPLIT]
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe", "lfm2"],
        [_LLAMA3_SPLIT],
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], [_QWEN2_SPLIT]),
}
_MERGEABLE_TYPES = (TokenType.NORMAL, TokenType.USER_DEFINED)


def build_gguf_tokenizer(metadata: dict) -> Tokenizer:
    """The tokenizer described by `tokenizer.ggml.*` metadata. Control and unknown tokens become special
    added tokens, user-defined ones plain added tokens, so both are matched whole in text.
    Raises ValueError for a `tokenizer.ggml.model` other than "gpt2" or "llama".
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if kind == "gpt2":
        tokenizer = _byte_level(tokens, token_types, metadata)
        add_bos_default = False
    elif kind == "llama":
        tokenizer = _sentencepiece(tokens, token_types, metadata)
        add_bos_default = True  # llama.cpp's default for SentencePiece files that do not say
    else:
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
        )

    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN)
    ])
    tokenizer.add_tokens([
        AddedToken(token, special=False, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type == TokenType.USER_DEFINED
    ])
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    tokenizer.post_processor = _bos_eos_processor(
        tokens,
        metadata.get("tokenizer.ggml.bos_token_id") if add_bos else None,
        metadata.get("tokenizer.ggml.eos_token_id") if add_eos else None,
    )
    return tokenizer


def _byte_level(tokens: list[str], token_types: list[int], metadata: dict) -> Tokenizer:
    # Regular tokens are stored in GPT-2's byte alphabet ("Ġthe"); added ones as plain text. Keep the latter
    # as they are, so the added-token entries land on their own ids rather than on new ones.
    byte_to_char = _bytes_to_unicode()
    alphabet = set(byte_to_char.values())
    vocab = {}
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type not in (TokenType.NORMAL, TokenType.BYTE, TokenType.UNUSED) or set(token) <= alphabet:
            vocab[token] = index
        else:
            vocab["".join(byte_to_char[b] for b in token.encode("utf-8"))] = index
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", ())]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    splits = _PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"), [_GPT2_SPLIT])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(tokens: list[str], token_types: list[int], metadata: dict) -> Tokenizer:
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(
        vocab, _merges_from_scores(tokens, scores, token_types, vocab),
        unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True, byte_fallback=True,
    ))
    # A normalizer, not a Metaspace pre-tokenizer: it runs on each stretch of text between special tokens,
    # so each gets its "▁" even when it starts with a space, as in SentencePiece and llama.cpp (and HF's
    # legacy Llama tokenizer.json). transformers' GGUF path prepends once and folds a leading space into it.
    add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    replace_spaces = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace_spaces]) if add_space_prefix else replace_spaces
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(
    tokens: list[str], scores: list[float], token_types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    # SentencePiece files list no merges: every way to cut a piece into two known pieces is a merge, ranked
    # by the piece's score (best first), as transformers' generate_merges does. Control, byte and unused
    # tokens are never the result of a merge.
    ranked = []
    for token, score, token_type in zip(tokens, scores, token_types):
        if token_type not in _MERGEABLE_TYPES:
            continue
        cuts = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        cuts.sort(key=lambda cut: (vocab[cut[0]], vocab[cut[1]]))
        ranked.extend((score, left, right) for left, right in cuts)
    ranked.sort(key=lambda merge: (merge[0], len(merge[1]), len(merge[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _bos_eos_processor(tokens: list[str], bos_id: int | None, eos_id: int | None) -> processors.TemplateProcessing:
    single, pair, special = ["$A"], ["$A", "$B:1"], []
    if bos_id is not None:
        single, pair = [tokens[bos_id]] + single, [tokens[bos_id]] + pair
        special.append((tokens[bos_id], bos_id))
    if eos_id is not None:
        single, pair = single + [tokens[eos_id]], pair + [tokens[eos_id]]
        special.append((tokens[eos_id], eos_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte → printable character table: printable Latin-1 stays, the rest moves to U+0100 and up.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table
