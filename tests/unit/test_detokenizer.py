"""IncrementalDetokenizer: streamed text never holds half a character and adds up to the full decode."""
import pytest

from ember.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji 🤖🎉👍🏽 and a family 👨‍👩‍👧‍👦 walk in.",
    "日本語のテキストと中文文本、한국어도",
    "Combining: e\u0301 a\u030a n\u0303 — and ∑ x² ≤ ∞",
    "def f(x):\n\treturn x  # done\n\n",
    "  spaces   everywhere  ",
    "Ünïcödé wörds and 日本語 text ✓",
]


def stream(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    pieces = [detokenizer.add([token_id]) for token_id in output_ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == detokenizer.text
    return pieces, detokenizer.text


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_streaming(embedded_tokenizer, text):
    tok = embedded_tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
    output_ids = tok.encode(text, add_special_tokens=False)
    pieces, full = stream(tok, prompt_ids, output_ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert full == tok.decode(output_ids) == text
    # Multi-byte characters are split across tokens here, so some steps must have held text back.
    if any(ord(c) > 0x7FF for c in text):
        assert "" in pieces[:-1]


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_streaming(sentencepiece_tokenizer, text):
    tok = sentencepiece_tokenizer
    output_ids = tok.encode(text, add_special_tokens=False)
    # After a prompt that ends in a special token, the output is decoded as a text of its own...
    pieces, full = stream(tok, [tok.bos_token_id], output_ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert full == tok.decode(output_ids)
    # ...after text, its first "▁" is a real space: the output continues the prompt.
    prompt_ids = tok.encode("The prompt")
    pieces, full = stream(tok, prompt_ids, output_ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert full == tok.decode(prompt_ids + output_ids)[len(tok.decode(prompt_ids)):]


def test_several_ids_per_step_and_special_tokens(embedded_tokenizer):
    tok = embedded_tokenizer
    output_ids = tok.encode("Sure 🤖!<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        detokenizer = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        text = detokenizer.add(output_ids[:2]) + detokenizer.add(output_ids[2:]) + detokenizer.flush()
        assert text == detokenizer.text == tok.decode(output_ids, skip_special_tokens=skip)
    assert detokenizer.text.endswith("<|im_end|>")


def test_unfinished_character_waits_for_flush(embedded_tokenizer):
    tok = embedded_tokenizer
    emoji_ids = tok.encode("🤖", add_special_tokens=False)
    assert len(emoji_ids) > 1  # byte-level BPE splits it, so the first ids are half a character
    detokenizer = IncrementalDetokenizer(tok, [])
    assert detokenizer.add([tok.encode("A", add_special_tokens=False)[0]]) == "A"
    assert detokenizer.add(emoji_ids[:1]) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.text == tok.decode(tok.encode("A", add_special_tokens=False) + emoji_ids[:1])
