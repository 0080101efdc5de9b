"""`ArrayGGUFReader`: gguf's `GGUFReader`, reading metadata arrays whole instead of element by element."""
from __future__ import annotations

import numpy as np
from gguf import GGUFReader, GGUFValueType


class ArrayGGUFReader(GGUFReader):
    """Same fields, tensors and `ReaderField.contents()` values as `GGUFReader`.

    GGUFReader makes a memory-mapped numpy view per array element (and two per string): a tokenizer's
    49k tokens and merges cost seconds. Here a numeric array is one view, and a string array's
    elements are memoryview slices (whose `tobytes()` is all `contents()` asks of a part).
    Only little-endian files take the fast path; others fall back to GGUFReader's.
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list[GGUFValueType]]:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        item_type = GGUFValueType(raw_item_type[0])
        offset = orig_offs + 12
        parts: list = [raw_item_type, length]
        if item_type == GGUFValueType.STRING:
            buffer = memoryview(self.data)  # slicing a memoryview is ~50x cheaper than slicing a memmap
            for _ in range(int(length[0])):
                size = int.from_bytes(buffer[offset:offset + 8], "little")
                parts.append(buffer[offset + 8:offset + 8 + size])
                offset += 8 + size
            return offset - orig_offs, parts, list(range(2, len(parts))), [GGUFValueType.ARRAY, item_type]
        numpy_type = self.gguf_scalar_to_np.get(item_type)
        if numpy_type is None:  # arrays of arrays: GGUFReader's generic walk
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offset, numpy_type, int(length[0]))
        parts.append(values)
        # contents() flattens every data part's tolist(): one part holding all values reads the same.
        return offset + int(values.nbytes) - orig_offs, parts, [2], [GGUFValueType.ARRAY, item_type]
