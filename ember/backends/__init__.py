"""Backends: one object per way of computing, chosen once at load (`select_backends`). Each linear layer gets a
quant method, each attention layer an attention backend (which builds its metadata), norms / activations /
rotary a pointwise backend, and a model may hand its layers to the fused decode path. Layers and models call
these objects and never branch on device, kernel library or weight format."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.backends.attention import CKernelAttention, ReferenceAttention, TritonAttention
from ember.backends.fused_decode import FusedDecode
from ember.backends.linear_c_kernels import CInt4Method, CInt8Method, CQ8_0Method
from ember.backends.linear_dense import DenseMethod
from ember.backends.linear_torch import TorchInt8HeadMethod, TorchQuantizedMethod
from ember.backends.linear_triton import TritonInt8Method
from ember.backends.pointwise import CKernelPointwise, TorchPointwise, TritonPointwise
from ember.ops.cpu_kernels import KernelLibrary


@dataclass(frozen=True)
class Backends:
    linear: DenseMethod  # the decoder layers' projections
    lm_head: DenseMethod
    attention: ReferenceAttention | TritonAttention
    pointwise: TorchPointwise | TritonPointwise
    fused_decode: FusedDecode | None
    kernels: KernelLibrary | None  # the C kernel library in use, if any

    @property
    def kernel_variant(self) -> str:
        """What /info and /metrics report: the C kernel variant, "triton", or "reference"."""
        if self.kernels is not None:
            return self.kernels.variant.name
        return "triton" if isinstance(self.attention, TritonAttention) else "reference"

    def describe(self) -> str:
        return (f"kernels {self.kernel_variant}; linear {self.linear.name}, lm_head {self.lm_head.name}, "
                f"attention {self.attention.name}" + (", fused decode" if self.fused_decode else ""))


def select_backends(*, device: torch.device, dtype: torch.dtype, quantize: str | None, batch_invariant: bool,
                    use_triton: bool, kernels: KernelLibrary | None, int8_activations: bool) -> Backends:
    """The backends for one model. `quantize`: "int4" | "int8" | None (the weight-only copies, see
    ember.runner.device.resolve_quantization); `kernels`: the C kernel library chosen for this CPU (None: the
    reference ops). Batch-invariant mode runs the dense, reference paths, whose results the tests compare bitwise."""
    if use_triton:
        linear = TritonInt8Method() if quantize == "int8" else DenseMethod()
        head = TritonInt8Method() if quantize else DenseMethod()
        return Backends(linear, head, TritonAttention(), TritonPointwise(), None, None)
    if device.type != "cpu" or dtype != torch.float32:  # the C kernels are float32 CPU kernels
        kernels = None
    pointwise = CKernelPointwise(kernels) if kernels is not None else TorchPointwise()
    if batch_invariant:
        dense = DenseMethod(batch_invariant=True)
        return Backends(dense, dense, ReferenceAttention(batch_invariant=True), pointwise, None, kernels)
    if kernels is None:
        linear = TorchQuantizedMethod(quantize) if quantize else DenseMethod()
        head = TorchInt8HeadMethod() if quantize else DenseMethod()
        return Backends(linear, head, ReferenceAttention(), pointwise, None, None)
    if quantize == "int4":
        linear = CInt4Method(kernels, int8_activations)
    elif quantize == "int8":
        linear = CInt8Method(kernels, int8_activations)
    else:
        linear = DenseMethod()
    if not quantize:
        head = DenseMethod()
    elif int8_activations and kernels.int8_activations:  # the head as llama.cpp applies it (a Q8_0 file's own blocks)
        head = CQ8_0Method(kernels)
    else:
        head = CInt8Method(kernels, int8_activations)
    fused = FusedDecode(kernels) if quantize == "int4" else None
    return Backends(linear, head, CKernelAttention(kernels), pointwise, fused, kernels)


def reference_backends(batch_invariant: bool = False) -> Backends:
    """Torch ops everywhere, dense weights: the oracle the other backends are tested against."""
    dense = DenseMethod(batch_invariant)
    return Backends(dense, dense, ReferenceAttention(batch_invariant), TorchPointwise(), None, None)
