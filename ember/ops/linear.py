"""Linear: the plain GEMM, a batch-invariant variant whose rows do not depend on the batch size, and
weight-only int4 / int8 matmuls for small row counts (Ember's C kernels, else PyTorch's packed ones)."""
import torch
import torch.nn.functional as F

from ember.int4_blocks import Int4Blocks
from ember.ops.cpu_kernels import KERNEL_COLUMN_GROUP, KernelLibrary

# Every GEMM of the batch-invariant path sees exactly this many rows. BLAS (MKL/oneDNN on CPU) picks its
# kernel, and so its summation order, by the number of rows; at a fixed row count a row's result was found
# independent of its position and of the other rows. 16 trades decode padding against prefill call count.
BATCH_INVARIANT_ROWS = 16


def linear(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None,  # [out_features]
    batch_invariant: bool = False,
) -> torch.Tensor:  # [num_tokens, out_features]
    if not batch_invariant:
        return F.linear(x, weight, bias)
    num_tokens = x.shape[0]
    num_pad = -num_tokens % BATCH_INVARIANT_ROWS
    if num_pad:
        x = torch.cat([x, x.new_zeros(num_pad, x.shape[1])])
    out = [F.linear(chunk, weight, bias) for chunk in x.split(BATCH_INVARIANT_ROWS)]
    return torch.cat(out)[:num_tokens]


# Weight-only kernels read 4 or 8 bits a weight instead of float32's 32. Ember's C kernels (float32
# activations) dequantize a block once for a few rows (decode) or into a panel in cache that a GEMM register
# tile sweeps over the rows (batches, prompts): at every row count they run at or above oneDNN's float32 GEMM
# on a prepacked weight (benchmarks/NOTES.md), so with them the quantized copy serves every batch and the
# float32 matrix is dropped. PyTorch's packed kernels, the fallback, want bfloat16 activations and re-read the
# weight per row: they serve up to 8 rows, the prepacked float32 weight the rest. Each output row is
# independent of the other rows in both.
TORCH_QUANTIZED_MAX_ROWS = 8
INT4_GROUP_SIZE = 32  # GGUF's block size: a Q4_0 / Q4_1 block is one group


def _padded_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """t with zero rows appended up to a multiple of `multiple` rows."""
    pad = -t.shape[0] % multiple
    return t if not pad else torch.cat([t, t.new_zeros(pad, *t.shape[1:])])


def _column_groups(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] (N a multiple of 16) -> [N / 16, ..., 16]: each group's 16 columns innermost."""
    groups = t.view(t.shape[0] // KERNEL_COLUMN_GROUP, KERNEL_COLUMN_GROUP, *t.shape[1:])
    return groups.movedim(1, -1).contiguous()


class Int4Weight:
    """Asymmetric min-max int4 per group of 32 inputs: w = d * q + m, q in 0..15.

    For a GGUF Q4_1 weight (w = d * q + m, each block spanning q = 0..15, as llama.cpp quantizes it) this
    recovers q, d and m; `from_blocks` takes them from the file instead. Stored for Ember's C kernel (d and m
    float16 values held as float32, in groups of 16 columns: qlinear.c's layout) or, without it, for
    `torch.ops.aten._weight_int4pack_mm_for_cpu`, which computes (q - 8) * scale + zero: scale = d,
    zero = m + 8d, in bfloat16.

    `kernels`: the C kernel library (None: PyTorch's kernels). `int8_activations` (where that library has them):
    the kernel of qlinear_i8.c, which rounds x to int8 per block of 32 inputs (as llama.cpp does) and runs ~2x
    faster; qs is then in that kernel's layout.
    """

    def __init__(self, weight: torch.Tensor, kernels: KernelLibrary | None,
                 int8_activations: bool = False):  # weight [out_features, in_features]
        out_features, in_features = weight.shape
        self.out_features, self.in_features = out_features, in_features
        self.kernels = kernels if usable(kernels, weight) else None
        self.use_kernel = self.kernels is not None
        self.int8_activations = self.use_kernel and int8_activations and kernels.int8_activations
        if self.use_kernel:
            weight = _padded_rows(weight, KERNEL_COLUMN_GROUP)
        rows = weight.shape[0]
        groups = weight.float().view(rows, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        w_min, w_max = groups.amin(-1), groups.amax(-1)  # [out, in // group]; torch.aminmax is ~4x slower here
        scale = ((w_max - w_min) / 15).clamp(min=1e-12)
        if self.use_kernel:  # d and m rounded to float16 (a GGUF block's own), q computed against them
            scale, w_min = scale.half().clamp_(min=2**-24).float(), w_min.half().float()
        # One temporary, then in place: each fresh full-size tensor costs start-up time in page faults.
        q = (groups - w_min[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        if self.use_kernel:
            half = INT4_GROUP_SIZE // 2
            self._store_for_kernel(q[..., :half] | (q[..., half:] << 4), scale, w_min)
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out_features, in_features).int(), 2)
        scales_and_zeros = torch.stack([scale, w_min + 8 * scale], -1).transpose(0, 1)  # [in // group, out, 2]
        self.scales_and_zeros = scales_and_zeros.contiguous().to(torch.bfloat16)

    @classmethod
    def from_blocks(cls, blocks: Int4Blocks, kernels: KernelLibrary, int8_activations: bool = False) -> "Int4Weight":
        """The C kernel's copy of a GGUF Q4_0 / Q4_1 weight: the file's bytes reshuffled, nothing rounded."""
        self = cls.__new__(cls)
        self.out_features, self.in_features = blocks.shape
        self.kernels, self.use_kernel = kernels, True
        self.int8_activations = int8_activations and kernels.int8_activations
        self._store_for_kernel(*(_padded_rows(t, KERNEL_COLUMN_GROUP) for t in (blocks.qs, blocks.d, blocks.m)))
        return self

    def _store_for_kernel(self, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> None:
        """packed uint8 [N, K / 32, 16] (byte j: input j in the low nibble, j + 16 in the high), d and m float32
        [N, K / 32]; N a multiple of 16."""
        self.d, self.m = _column_groups(d), _column_groups(m)  # [N / 16, K / 32, 16]
        if self.int8_activations:  # byte (s, c, i) of a block: column c's input 4s + i (low nibble), 16 + 4s + i
            nibbles = packed.view(packed.shape[0] // KERNEL_COLUMN_GROUP, KERNEL_COLUMN_GROUP, -1, 4, 4)
            self.qs = nibbles.permute(0, 2, 3, 1, 4).contiguous()  # [N / 16, K / 32, 4 s, 16 c, 4 i]: one copy
        else:  # byte (j, c) of a block: column c's input j (low nibble) and j + 16 (high)
            self.qs = _column_groups(packed)  # [N / 16, K / 32, 16 j, 16 c]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [num_tokens, out], x's dtype
        if self.use_kernel:  # a float32 weight, so a float32 model
            out = self.kernels.q4_linear(x.contiguous(), self.qs, self.d, self.m, self.int8_activations)
            out = _unpadded(out, self.out_features)
            return out if bias is None else out.add_(bias)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)
        return out.to(x.dtype) if bias is None else out.to(x.dtype) + bias

    def dequantized(self) -> torch.Tensor:  # [out_features, in_features] float32: the weight the kernel applies
        if not self.use_kernel:
            raise NotImplementedError("only the C kernel's layout is unpacked")
        qs = self.qs
        if self.int8_activations:  # [N / 16, K / 32, 4 s, 16 c, 4 i] -> qlinear.c's [N / 16, K / 32, 16 j, 16 c]
            qs = qs.movedim(-2, -1).flatten(-3, -2)
        qs = qs.movedim(-1, 1)  # [N / 16, 16 c, K / 32, 16 j]
        q = torch.cat([qs & 0x0F, qs >> 4], -1).float()  # inputs j, then j + 16
        w = q * self.d.movedim(-1, 1)[..., None] + self.m.movedim(-1, 1)[..., None]
        return w.reshape(-1, self.in_features)[: self.out_features]


class Int8Weight:
    """Symmetric int8 per output channel (the LM head: GGUF files that store their layers in 4 bits keep the
    output matrix at 8 or more), for Ember's C kernel (in groups of 16 columns: qlinear.c's layout) or
    `torch.ops.aten._weight_int8pack_mm` (the plain [out, in] matrix, `weight`).

    `int8_activations` (where the library has them): qlinear_i8.c's kernel, x rounded to int8 per block of 32
    inputs as for Int4Weight; qs then holds q + 128 in that kernel's layout."""

    def __init__(self, weight: torch.Tensor, kernels: KernelLibrary | None,
                 int8_activations: bool = False):  # [out_features, in_features]
        self.out_features, self.in_features = weight.shape
        scale = weight.new_empty(self.out_features, dtype=torch.float32)  # [out]
        q = weight.new_empty(weight.shape, dtype=torch.int8)
        # A few hundred rows at a time: each step's temporaries stay in cache (start-up time for a big head).
        for start in range(0, self.out_features, 512):
            w = weight[start:start + 512].float()
            # max |w| without an abs() copy (and amin + amax beat torch.aminmax ~3x on CPU)
            s = (torch.maximum(-w.amin(1), w.amax(1)) / 127).clamp_(min=1e-12)
            scale[start:start + 512] = s
            q[start:start + 512] = w.div(s[:, None]).round_().clamp_(-127, 127)
        self.kernels = kernels if usable(kernels, weight) and weight.shape[1] % 32 == 0 else None
        self.use_kernel = self.kernels is not None
        self.int8_activations = self.use_kernel and int8_activations and kernels.int8_activations
        if self.int8_activations:  # [N / 16, K / 4, 16 c, 4 i]: 4 inputs of 16 columns a 64-byte row
            offset = _padded_rows(q, KERNEL_COLUMN_GROUP).view(torch.uint8) ^ 0x80  # q + 128 (two's complement)
            groups = offset.view(-1, KERNEL_COLUMN_GROUP, self.in_features // 4, 4)
            self.packed = groups.transpose(1, 2).contiguous()
            self.scales = _padded_rows(scale, KERNEL_COLUMN_GROUP)
        elif self.use_kernel:
            self.packed = _column_groups(_padded_rows(q, KERNEL_COLUMN_GROUP))  # [N / 16, K, 16]
            self.scales = _padded_rows(scale, KERNEL_COLUMN_GROUP)
        else:
            self.weight, self.scales = q, scale.to(torch.bfloat16)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.use_kernel:
            out = self.kernels.q8_linear(x.contiguous(), self.packed, self.scales, self.int8_activations)
            out = _unpadded(out, self.out_features)
        else:
            out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)
        return out if bias is None else out + bias

    def dequantized(self) -> torch.Tensor:  # [out_features, in_features] float32: the weight applied
        if not self.use_kernel:
            return self.weight.float() * self.scales.float()[:, None]
        if self.int8_activations:
            q = (self.packed ^ 0x80).view(torch.int8).transpose(1, 2).reshape(-1, self.in_features)
        else:
            q = self.packed.movedim(-1, 1).reshape(-1, self.in_features)
        return (q.float() * self.scales[:, None])[: self.out_features]


class Q8_0Weight:
    """GGUF's Q8_0: w = d * q per block of 32 inputs, q int8 and d a float16 value, quantized as llama.cpp does
    (d = max|w| / 127, q = round(w / d), halves away from zero), so a weight dequantized from a Q8_0 file (the
    embedded model's head) gets the file's own blocks back exactly. Applied by q8_0_i8_linear with x rounded to
    int8 per block of 32: llama.cpp's Q8_0 x Q8_0 dot product. The kernels must have int8 activations."""

    def __init__(self, weight: torch.Tensor, kernels: KernelLibrary):  # [out_features, in_features]
        self.out_features, self.in_features = weight.shape
        self.kernels = kernels
        num_blocks = self.in_features // 32
        padded = _padded_rows(weight, KERNEL_COLUMN_GROUP)
        q = torch.empty(padded.shape, dtype=torch.int8)
        d = torch.empty(padded.shape[0], num_blocks)
        for start in range(0, padded.shape[0], 512):  # a few hundred rows at a time: temporaries stay in cache
            blocks = padded[start:start + 512].float().view(-1, num_blocks, 32)
            scale = torch.maximum(-blocks.amin(-1), blocks.amax(-1)) / 127
            inverse = torch.where(scale > 0, 1 / scale, 0)
            v = blocks * inverse[..., None]
            q[start:start + 512] = (v.abs() + 0.5).floor_().copysign_(v).clamp_(-127, 127).view(-1, self.in_features)
            d[start:start + 512] = scale.half().float()
        groups = padded.shape[0] // KERNEL_COLUMN_GROUP
        offset = q.view(torch.uint8) ^ 0x80  # q + 128 (two's complement)
        # [N / 16, K / 32, 8 s, 16 c, 4 i]: byte (s, c, i) of a block is column c's input 4s + i
        self.qs = offset.view(groups, KERNEL_COLUMN_GROUP, num_blocks, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
        self.d = d.view(groups, KERNEL_COLUMN_GROUP, num_blocks).transpose(1, 2).contiguous()  # [N / 16, K / 32, 16]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = _unpadded(self.kernels.q8_0_linear(x.contiguous(), self.qs, self.d), self.out_features)
        return out if bias is None else out + bias

    def dequantized(self) -> torch.Tensor:  # [out_features, in_features] float32: the weight applied
        q = (self.qs ^ 0x80).view(torch.int8).permute(0, 3, 1, 2, 4).reshape(-1, self.in_features // 32, 32)
        d = self.d.transpose(1, 2).reshape(-1, self.in_features // 32, 1)
        return (q.float() * d).view(-1, self.in_features)[: self.out_features]


def usable(kernels: KernelLibrary | None, weight: torch.Tensor) -> bool:
    """The C kernels apply: there is a library, and the weight is a float32 CPU matrix."""
    return kernels is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"


def _unpadded(out: torch.Tensor, columns: int) -> torch.Tensor:
    return out if out.shape[1] == columns else out[:, :columns].contiguous()


def can_prepack(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()


class PrepackedWeight:
    """A float32 weight reordered once into oneDNN's blocked layout (`torch.ops.mkldnn`), as inductor's
    freezing does. From 8 to ~128 rows it runs 2-4x faster than MKL's GEMM on the plain matrix here
    (MKL's small-M threading is the slow part), and within ~10% at prompt sizes. Same float32 math."""

    def __init__(self, weight: torch.Tensor):  # [out_features, in_features] float32
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 512)  # laid out for batches of ~512 rows

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [num_tokens, out]
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, bias, "none", [], "")


class TransposedProductWeight:
    """x W^T computed as (W x^T)^T on the plain matrix, for the LM head (often tied to the embedding, so it
    keeps its plain layout): MKL runs this tall, thin product ~2x faster at 16-64 rows (measured)."""

    def __init__(self, weight: torch.Tensor):  # [out_features, in_features]
        self.weight = weight

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [num_tokens, out]
        out = torch.mm(self.weight, x.t()).t()
        return out if bias is None else out + bias
