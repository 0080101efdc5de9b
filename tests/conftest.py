"""Shared fixtures. The embedded-model LLM is loaded once per test session (loading costs seconds)."""
import os

import pytest
import torch

# Without a GPU the Triton kernels (the GPU path) run under Triton's interpreter on CPU tensors. Set before any
# kernel module is imported: @triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def llm():
    from ember import LLM

    return LLM(progress=False, max_model_len=1024, kv_cache_memory_gib=0.25, batch_invariant=True)


# ---- loader & tokenizer fixtures (tests/unit/test_loader.py, test_tokenizer.py, test_detokenizer.py) ----
# transformers is the reference: loading it and the embedded GGUF costs tens of seconds, so once per session.


@pytest.fixture(scope="session")
def embedded_gguf_path():
    from ember.loader import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_gguf_path):
    from ember.loader import read_gguf_metadata
    from ember.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(embedded_gguf_path))


@pytest.fixture(scope="session")
def reference_tokenizer(embedded_gguf_path):
    """transformers' tokenizer for the embedded GGUF."""
    import os

    from transformers import AutoTokenizer

    folder, name = os.path.split(embedded_gguf_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def sentencepiece_gguf(tmp_path_factory):
    """`(gguf_path, processor)`: a tiny SentencePiece BPE model trained here, written as llama.cpp's
    convert_hf_to_gguf.py writes a "llama" vocabulary; the processor is the reference tokenizer."""
    import io

    import gguf
    import numpy as np
    import sentencepiece as spm

    corpus = [
        "The quick brown fox jumps over the lazy dog.", "Hello world! Hello there, world.",
        "def main():\n    return 42", "Numbers 123 and 4567 are here.", "Tokenizers split text into pieces.",
        "Ünïcödé wörds and 日本語 text.",
    ] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=450, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, user_defined_symbols=["<|user|>"], hard_vocab_limit=False, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(processor.vocab_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        if processor.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif processor.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif processor.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif tokens[-1] == "<|user|>":
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path), processor


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(sentencepiece_gguf):
    from ember.loader import read_gguf_metadata
    from ember.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(sentencepiece_gguf[0]))
