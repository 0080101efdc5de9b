"""Dense linear layers, plain or fused (several HF projections in one weight, loaded shard by shard).

`quantize(kind)` adds weight-only copies after loading: on a CPU for decode-sized batches, on the GPU
path (`use_triton`) an int8 weight that replaces the plain one for every batch size.
"""
import torch
from torch import nn

from ember.int4_blocks import Int4Blocks
from ember.ops.linear import (INT4_GROUP_SIZE, Int4Weight, Int8Weight, PrepackedWeight, can_prepack,
                              linear)


class Linear(nn.Module):
    """y = x W^T + b, where W stacks one block of rows per entry of `output_sizes` (e.g. q, k, v)."""

    use_triton = False  # the GPU path's kernels (set by the runner before `quantize`)
    int8_activations = False  # CPU copies: the int8-activation kernels (set by the runner before `quantize`)
    # Int4Blocks from the loader are kept for `quantize` to repack, the float weight never written (set by the
    # runner before loading, when int4 copies on the C kernels will replace the float weight)
    keep_int4_blocks = False

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        batch_invariant: bool = False,
    ):
        super().__init__()
        self.output_sizes = list(output_sizes)
        self.batch_invariant = batch_invariant
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.int4_blocks: dict[int, Int4Blocks] = {}  # by shard (0 for a whole weight)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(output_sizes), dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None) -> None:
        """Copies a checkpoint tensor into the whole parameter (shard_id None) or into its shard_id-th row block."""
        target = param.data
        if shard_id is not None:
            offset = sum(self.output_sizes[:shard_id])
            target = target.narrow(0, offset, self.output_sizes[shard_id])
        if isinstance(loaded, Int4Blocks) and param is self.weight and self.keep_int4_blocks:
            check_shape(target, loaded)
            self.int4_blocks[shard_id or 0] = loaded
            return
        copy_checked(target, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, input_size] -> [num_tokens, sum(output_sizes)]
        return quantized_or_dense(self, x, self.weight, self.bias)

    def quantize(self, kind: str = "int4") -> None:
        """CPU: an int4 (or int8) copy of the weight. On Ember's C kernels it serves every batch and replaces
        the plain matrix; on PyTorch's (small batches only) larger ones get the float32 weight prepacked for
        oneDNN, which replaces the plain matrix (same bytes). GPU path: an int8 weight for the Triton kernel
        replaces the plain matrix at every batch size."""
        if self.use_triton:
            from ember.ops.triton_linear import TritonInt8Weight

            self.prepacked = TritonInt8Weight(self.weight.data)
            self.weight.data = self.weight.data.new_empty(0, self.weight.shape[1])
            return
        if kind == "int4" and len(self.int4_blocks) == len(self.output_sizes):  # straight from the file's blocks
            blocks = Int4Blocks.cat([self.int4_blocks[i] for i in sorted(self.int4_blocks)])
            self.int4_blocks = {}
            self.quantized = Int4Weight.from_blocks(blocks, self.int8_activations)
            self.weight.data = self.weight.data.new_empty(0, self.weight.shape[1])  # never written
            return
        for shard_id, blocks in self.int4_blocks.items():  # some shards came as floats: write these beside them
            offset = sum(self.output_sizes[:shard_id])
            self.weight.data.narrow(0, offset, blocks.shape[0]).copy_(blocks.dequantize())
        self.int4_blocks = {}
        if kind == "int8":
            self.quantized = Int8Weight(self.weight.data, self.int8_activations)
        elif self.weight.shape[1] % INT4_GROUP_SIZE == 0:  # else it stays dense
            self.quantized = Int4Weight(self.weight.data, self.int8_activations)
        if self.batch_invariant:  # its GEMMs run on the plain matrix
            return
        if getattr(self, "quantized", None) is not None and self.quantized.max_rows is None:
            self.weight.data = self.weight.data.new_empty(0, self.weight.shape[1])  # only the quantized copy is read
        elif can_prepack(self.weight):
            self.prepacked = PrepackedWeight(self.weight.data)
            self.weight.data = self.weight.data.new_empty(0, self.weight.shape[1])  # only the packed copy is read


def quantized_or_dense(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The quantized copy (`module.quantized`, if any) for up to its `max_rows` rows (None: all), else the prepacked
    weight that replaced the plain one (`module.prepacked`), else the plain dense GEMM. Batch-invariant mode
    on a CPU keeps the dense path, whose results the tests compare bitwise."""
    quantized = getattr(module, "quantized", None)
    if quantized is not None and not module.batch_invariant and (
            quantized.max_rows is None or x.shape[0] <= quantized.max_rows):
        return quantized.linear(x, bias)
    prepacked = getattr(module, "prepacked", None)
    if prepacked is not None:
        return prepacked.linear(x, bias)
    return linear(x, weight, bias, module.batch_invariant)


def check_shape(target: torch.Tensor, loaded: torch.Tensor | Int4Blocks) -> None:
    if tuple(loaded.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match expected {tuple(target.shape)}")


def copy_checked(target: torch.Tensor, loaded: torch.Tensor | Int4Blocks) -> None:
    """In-place copy (casting dtype, dequantizing blocks) that refuses a shape mismatch instead of broadcasting."""
    check_shape(target, loaded)
    target.copy_(loaded.dequantize() if isinstance(loaded, Int4Blocks) else loaded)
