"""The loader's fast GGUF paths against the gguf package's own: ArrayGGUFReader's metadata and tensors
against GGUFReader's, the torch dequantizers against gguf.quants.dequantize, bit for bit."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from ember.loader.gguf_dequant import dequantize
from ember.loader.gguf_reader import ArrayGGUFReader


def _contents(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def test_reader_matches_gguf_on_every_value_type(tmp_path):
    path = tmp_path / "values.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("t.strings", ["a", "Ġthe", "", "日本語", "<|im_end|>"])
    writer.add_array("t.empty", [])
    writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_string("t.string", "hello")
    writer.add_uint32("t.uint", 7)
    writer.add_bool("t.bool", True)
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("q", gguf_quantize(np.ones((2, 32), np.float32), GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    fast, reference = ArrayGGUFReader(str(path)), GGUFReader(str(path))
    assert _contents(fast) == _contents(reference)
    assert list(fast.fields) == list(reference.fields)
    assert _contents(fast)["t.strings"] == ["a", "Ġthe", "", "日本語", "<|im_end|>"]
    for ours, theirs in zip(fast.tensors, reference.tensors, strict=True):
        assert (ours.name, ours.tensor_type, ours.data_offset) == (theirs.name, theirs.tensor_type, theirs.data_offset)
        assert np.array_equal(ours.data, theirs.data)


def test_reader_matches_gguf_on_the_embedded_file(embedded_gguf_path):
    assert _contents(ArrayGGUFReader(embedded_gguf_path)) == _contents(GGUFReader(embedded_gguf_path))


_TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
          GGMLQuantizationType.BF16, GGMLQuantizationType.F16, GGMLQuantizationType.F32]  # the last 3: gguf's own


@pytest.mark.parametrize("tensor_type", _TYPES, ids=[t.name for t in _TYPES])
def test_dequantize_is_bit_identical_to_gguf(tensor_type):
    weights = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 0.1
    weights[0, :32] = 0  # an all-zero block: scale 0
    data = weights if tensor_type == GGMLQuantizationType.F32 else gguf_quantize(weights, tensor_type)
    ours = dequantize(data, tensor_type)
    assert ours.shape == (8, 512) and ours.is_contiguous()
    assert np.array_equal(ours.numpy().view(np.uint32), gguf_dequantize(data, tensor_type).view(np.uint32))


def test_dequantize_is_bit_identical_to_gguf_on_the_embedded_file(embedded_gguf_path):
    for tensor in ArrayGGUFReader(embedded_gguf_path).tensors:
        ours = dequantize(tensor.data, tensor.tensor_type).numpy()
        reference = gguf_dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32)), tensor.name
        assert ours.flags.writeable  # owns its memory, not a view of the read-only map
