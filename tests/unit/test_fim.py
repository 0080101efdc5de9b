"""Fill-in-the-middle: templates detected from each family's special tokens (or GGUF's fim ids), and the exact
prompt ids for plain FIM, repository context and llama.cpp's snippet fallback, on tiny word-level tokenizers."""
import pytest
from gguf import TokenType
from tokenizers import AddedToken, Regex, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from ember.tokenizer import FimTemplate, Tokenizer, detect_fim_template

WORDS = ["[UNK]", "x", "y", "=", " ", "1", "\n", "print", "(", ")", "util", ".", "py", "main", "myproject", "ember",
         "-", "snippet"]
PREFIX, SUFFIX = "x = ", "\nprint(x)"
PRE = ["x", " ", "=", " "]  # PREFIX's pieces
SUF = ["\n", "print", "(", "x", ")"]
EXTRA_FILES = [("util.py", "y = 1")]
SNIPPET = ["\n", "\n", "-", "-", "-", " ", "snippet", " ", "-", "-", "-", "\n", "\n"]

# family → (special tokens in id order, bos token added to encoded text or None)
FAMILIES = {
    "starcoder": (
        ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>"],
        None,
    ),
    "santacoder": (["<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"], None),
    "codellama": (["<unk>", "<s>", "</s>", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"], "<s>"),
    "deepseek": (
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>"],
        "<｜begin▁of▁sentence｜>",
    ),
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
         "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"],
        None,
    ),
    "codegemma": (
        ["<pad>", "<eos>", "<bos>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"],
        "<bos>",
    ),
    "codestral": (["<unk>", "<s>", "</s>", "[PREFIX]", "[MIDDLE]", "[SUFFIX]"], "<s>"),
}

# family → (prefix, suffix, middle, file separator, repo name, stop tokens), as spelled
EXPECTED_TOKENS = {
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<repo_name>",
                  {"<fim_pad>", "<repo_name>", "<file_sep>", "<|endoftext|>"}),
    "santacoder": ("<fim-prefix>", "<fim-suffix>", "<fim-middle>", None, None, {"<fim-pad>", "<|endoftext|>"}),
    "codellama": ("▁<PRE>", "▁<SUF>", "▁<MID>", None, None, {"▁<EOT>"}),
    "deepseek": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", None, None, {"<|EOT|>"}),
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>", "<|repo_name|>",
             {"<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|endoftext|>"}),
    "codegemma": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>", None,
                  {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"}),
    "codestral": ("[PREFIX]", "[SUFFIX]", None, None, None, set()),
}

PLAIN = {
    "starcoder": ["<fim_prefix>", *PRE, "<fim_suffix>", *SUF, "<fim_middle>"],
    "santacoder": ["<fim-prefix>", *PRE, "<fim-suffix>", *SUF, "<fim-middle>"],
    "codellama": ["<s>", "▁<PRE>", *PRE, "▁<SUF>", *SUF, "▁<MID>"],
    "deepseek": ["<｜begin▁of▁sentence｜>", "<｜fim▁begin｜>", *PRE, "<｜fim▁hole｜>", *SUF, "<｜fim▁end｜>"],
    "qwen": ["<|fim_prefix|>", *PRE, "<|fim_suffix|>", *SUF, "<|fim_middle|>"],
    "codegemma": ["<bos>", "<|fim_prefix|>", *PRE, "<|fim_suffix|>", *SUF, "<|fim_middle|>"],
    "codestral": ["<s>", "[SUFFIX]", *SUF, "[PREFIX]", *PRE],  # suffix first, no middle token
}


def make_tokenizer(special_tokens, bos=None, fim_token_ids=None) -> Tokenizer:
    """Word-level: each word, space, newline and punctuation mark is one token; special tokens follow WORDS."""
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w]"), behavior="isolated")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    bos_id = None if bos is None else backend.token_to_id(bos)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=[bos, "$A"], special_tokens=[(bos, bos_id)])
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_id=None, fim_token_ids=fim_token_ids)


def family_tokenizer(family: str) -> Tokenizer:
    return make_tokenizer(*FAMILIES[family])


def pieces(tokenizer: Tokenizer, token_ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(token_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_detects_each_family(family):
    tok = family_tokenizer(family)
    vocab = tok.get_vocab()
    prefix, suffix, middle, file_sep, repo_name, stops = EXPECTED_TOKENS[family]
    assert tok.fim_token_ids == {}
    assert detect_fim_template(tok) == FimTemplate(
        family=family,
        prefix_id=vocab[prefix],
        suffix_id=vocab[suffix],
        middle_id=vocab.get(middle),
        suffix_first=family == "codestral",
        file_sep_id=vocab.get(file_sep),
        repo_name_id=vocab.get(repo_name),
        stop_token_ids=frozenset(vocab[s] for s in stops),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_fim(family):
    tok = family_tokenizer(family)
    template = detect_fim_template(tok)
    assert pieces(tok, template.render(tok, PREFIX, SUFFIX)) == PLAIN[family]
    # Empty pieces add nothing between the FIM tokens.
    empty = [p for p in PLAIN[family] if p not in PRE + SUF]
    assert pieces(tok, template.render(tok, "", "")) == empty


def test_plain_fim_exact_ids():
    # WORDS take ids 0-17, then <|endoftext|> 18, <fim_prefix> 19, <fim_middle> 20, <fim_suffix> 21, ...
    tok = family_tokenizer("starcoder")
    assert detect_fim_template(tok).render(tok, PREFIX, SUFFIX) == [19, 1, 4, 3, 4, 21, 6, 7, 8, 1, 9, 20]


def test_repo_context_qwen():
    tok = family_tokenizer("qwen")
    template = detect_fim_template(tok)
    fim = ["<|fim_prefix|>", *PRE, "<|fim_suffix|>", *SUF, "<|fim_middle|>"]
    ids = template.render(tok, PREFIX, SUFFIX, extra_files=EXTRA_FILES, filename="main.py")
    assert pieces(tok, ids) == [
        "<|repo_name|>", "myproject", "\n",
        "<|file_sep|>", "util", ".", "py", "\n", "y", " ", "=", " ", "1",
        "<|file_sep|>", "main", ".", "py", "\n",
        *fim,
    ]  # fmt: skip
    # A filename alone still opens the repository context, under the given repo name.
    ids = template.render(tok, PREFIX, SUFFIX, filename="main.py", repo_name="ember")
    assert pieces(tok, ids) == ["<|repo_name|>", "ember", "\n", "<|file_sep|>", "main", ".", "py", "\n", *fim]
    # Extra files without a filename: the current file's header is a bare newline.
    ids = template.render(tok, PREFIX, SUFFIX, extra_files=EXTRA_FILES)
    assert pieces(tok, ids)[13:16] == ["<|file_sep|>", "\n", "<|fim_prefix|>"]


def test_repo_context_starcoder():
    tok = family_tokenizer("starcoder")
    ids = detect_fim_template(tok).render(tok, PREFIX, SUFFIX, extra_files=EXTRA_FILES * 2, filename="main.py")
    util = ["<file_sep>", "util", ".", "py", "\n", "y", " ", "=", " ", "1"]
    assert pieces(tok, ids) == [
        "<repo_name>", "myproject", "\n", *util, *util, "<file_sep>", "main", ".", "py", "\n",
        "<fim_prefix>", *PRE, "<fim_suffix>", *SUF, "<fim_middle>",
    ]  # fmt: skip


def test_repo_context_codegemma_has_no_repo_name():
    tok = family_tokenizer("codegemma")
    ids = detect_fim_template(tok).render(tok, PREFIX, SUFFIX, extra_files=EXTRA_FILES, filename="main.py")
    assert pieces(tok, ids) == [
        "<bos>",
        "<|file_separator|>", "util", ".", "py", "\n", "y", " ", "=", " ", "1",
        "<|file_separator|>", "main", ".", "py", "\n",
        "<|fim_prefix|>", *PRE, "<|fim_suffix|>", *SUF, "<|fim_middle|>",
    ]  # fmt: skip


def test_snippet_fallback_without_file_separator():
    tok = family_tokenizer("deepseek")
    files = [("util.py", "y = 1"), ("other.py", "x")]
    ids = detect_fim_template(tok).render(tok, PREFIX, SUFFIX, extra_files=files, filename="main.py")
    assert pieces(tok, ids) == [
        "<｜begin▁of▁sentence｜>",
        *SNIPPET, "y", " ", "=", " ", "1",
        *SNIPPET, "x",
        "<｜fim▁begin｜>", *PRE, "<｜fim▁hole｜>", *SUF, "<｜fim▁end｜>",
    ]  # fmt: skip
    # A filename without extra files adds nothing.
    assert pieces(tok, detect_fim_template(tok).render(tok, PREFIX, SUFFIX, filename="main.py")) == PLAIN["deepseek"]


def test_codestral_snippet_fallback_keeps_suffix_first():
    tok = family_tokenizer("codestral")
    ids = detect_fim_template(tok).render(tok, PREFIX, SUFFIX, extra_files=[("util.py", "y")])
    assert pieces(tok, ids) == ["<s>", *SNIPPET, "y", "[SUFFIX]", *SUF, "[PREFIX]", *PRE]


def test_fim_spellings_qwen_without_separators_is_not_codegemma():
    tok = make_tokenizer(["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"])
    template = detect_fim_template(tok)
    assert (template.family, template.file_sep_id, template.repo_name_id) == ("qwen", None, None)
    assert template.stop_token_ids == {tok.get_vocab()["<|endoftext|>"]}


def test_codellama_without_the_space_marker():
    tok = make_tokenizer(["<s>", "<PRE>", "<SUF>", "<MID>", "<EOT>"], bos="<s>")
    template = detect_fim_template(tok)
    assert template.family == "codellama"
    assert pieces(tok, template.render(tok, "x", "y")) == ["<s>", "<PRE>", "x", "<SUF>", "y", "<MID>"]
    assert pieces(tok, sorted(template.stop_token_ids)) == ["<EOT>"]


def test_no_fim_tokens():
    assert detect_fim_template(make_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])) is None
    # Prefix and suffix without a middle token is not a template either.
    assert detect_fim_template(make_tokenizer(["<fim_prefix>", "<fim_suffix>", "<fim_pad>"])) is None


def test_no_fim_tokens_in_smollm2(embedded_tokenizer):
    # SmolLM2 has StarCoder's <repo_name> and <file_sep> but no FIM tokens.
    assert "<file_sep>" in embedded_tokenizer.get_vocab()
    assert detect_fim_template(embedded_tokenizer) is None


def test_fim_token_ids_win_over_the_vocabulary():
    # Both CodeLlama spellings exist; the vocabulary lookup would take "▁<PRE>", the GGUF ids say "<PRE>".
    specials = ["<s>", "▁<PRE>", "▁<SUF>", "▁<MID>", "<PRE>", "<SUF>", "<MID>", "<EOT>"]
    vocab = make_tokenizer(specials).get_vocab()
    ids = {"pre": vocab["<PRE>"], "suf": vocab["<SUF>"], "mid": vocab["<MID>"]}
    tok = make_tokenizer(specials, fim_token_ids=ids)
    template = detect_fim_template(tok)
    assert (template.family, template.prefix_id, template.suffix_id, template.middle_id) == (
        "codellama", vocab["<PRE>"], vocab["<SUF>"], vocab["<MID>"]
    )
    assert template.stop_token_ids == {vocab["<EOT>"]}  # the family's stops still come from the vocabulary
    assert detect_fim_template(make_tokenizer(specials)).prefix_id == vocab["▁<PRE>"]


def test_fim_token_ids_of_an_unknown_family():
    # Ids pointing at tokens no family spells this way: family "gguf", separator, repo and pad from the ids.
    specials = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<A>", "<B>", "<C>", "<PADDING>", "<REPO>", "<SEP>"]
    vocab = make_tokenizer(specials).get_vocab()
    ids = {key: vocab[t] for key, t in zip(["pre", "suf", "mid", "pad", "rep", "sep"], specials[3:])}
    tok = make_tokenizer(specials, fim_token_ids=ids)
    template = detect_fim_template(tok)
    assert template == FimTemplate(
        family="gguf", prefix_id=ids["pre"], suffix_id=ids["suf"], middle_id=ids["mid"], file_sep_id=ids["sep"],
        repo_name_id=ids["rep"], stop_token_ids=frozenset([ids["pad"], ids["rep"], ids["sep"]]),
    )  # fmt: skip
    assert pieces(tok, template.render(tok, "x", "y", filename="main.py")) == [
        "<REPO>", "myproject", "\n", "<SEP>", "main", ".", "py", "\n", "<A>", "x", "<B>", "y", "<C>"
    ]
    # Without pre, suf and mid all present the vocabulary decides.
    partial = make_tokenizer(specials, fim_token_ids={"pre": ids["pre"], "suf": ids["suf"]})
    assert detect_fim_template(partial).family == "starcoder"


def gguf_metadata(**fim_ids) -> dict:
    control = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<|file_sep|>"]
    tokens = [*control, "a", "b", "Ċ"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TokenType.CONTROL if t in control else TokenType.NORMAL for t in tokens],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        **{f"tokenizer.ggml.{key}_token_id": token_id for key, token_id in fim_ids.items()},
    }


def test_from_gguf_metadata_reads_fim_ids():
    tok = Tokenizer.from_gguf_metadata(gguf_metadata(fim_pre=1, fim_suf=3, fim_mid=2, fim_pad=4, fim_sep=5))
    assert tok.fim_token_ids == {"pre": 1, "suf": 3, "mid": 2, "pad": 4, "sep": 5}
    template = detect_fim_template(tok)
    assert (template.family, template.file_sep_id, template.repo_name_id) == ("starcoder", 5, None)
    assert template.stop_token_ids == {0, 4, 5}  # <|endoftext|>, fim pad, file separator
    assert template.render(tok, "a", "b") == [1, 6, 3, 7, 2]
    # "Ċ" (8) is the newline in GPT-2's byte alphabet.
    ids = template.render(tok, "a", "b", extra_files=[("b", "a")], filename="a")
    assert ids == [5, 7, 8, 6, 5, 6, 8, 1, 6, 3, 7, 2]


def test_from_gguf_metadata_legacy_fim_ids():
    tok = Tokenizer.from_gguf_metadata(gguf_metadata(prefix=1, suffix=3, middle=2))
    assert tok.fim_token_ids == {"pre": 1, "suf": 3, "mid": 2}
    # The fim_* names win over the legacy ones.
    tok = Tokenizer.from_gguf_metadata(gguf_metadata(prefix=6, suffix=6, middle=6, fim_pre=1, fim_suf=3, fim_mid=2))
    assert tok.fim_token_ids == {"pre": 1, "suf": 3, "mid": 2}
    assert Tokenizer.from_gguf_metadata(gguf_metadata()).fim_token_ids == {}


def test_code_with_special_token_text_stays_text():
    """Code that spells a special token (a string constant, a test fixture) is text unless parse_special."""
    tok = family_tokenizer("qwen")
    template = detect_fim_template(tok)
    eot, fim_middle = tok.get_vocab()["<|endoftext|>"], tok.get_vocab()["<|fim_middle|>"]
    code = 'END = "<|endoftext|><|fim_middle|>"\n'
    plain = template.render(tok, code, "\n")
    assert eot not in plain and plain.count(fim_middle) == 1  # the template's own middle token only
    assert eot in template.render(tok, code, "\n", parse_special=True)
