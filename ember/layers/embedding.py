"""Token embedding and the LM head (which may share the embedding's weight)."""
import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.linear import quantized_or_dense
from ember.ops.linear import Int8Weight, TransposedProductWeight


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden_size]
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden -> float32 logits; with `tied_to`, it reuses the embedding's parameter instead of owning one."""

    use_triton = False  # the GPU path's kernels (set by the runner before `quantize`)
    int8_activations = False  # the CPU copy: the int8-activation kernel (set by the runner before `quantize`)

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        dtype: torch.dtype,
        tied_to: VocabEmbedding | None = None,
        batch_invariant: bool = False,
    ):
        super().__init__()
        self.batch_invariant = batch_invariant
        self.is_tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [num_seqs, hidden] -> [num_seqs, vocab]
        return quantized_or_dense(self, hidden_states, self.weight, None).float()

    def quantize(self, kind: str = "int4") -> None:
        """An int8 copy: the head is the model's largest matrix, and the most sensitive. On Ember's C kernel it
        serves every batch; on PyTorch's (small batches only) larger ones take the transposed product on the
        plain matrix. GPU path: the int8 copy serves every batch. The plain matrix stays only when the
        embedding shares it."""
        if self.use_triton:
            from ember.ops.triton_linear import TritonInt8Weight

            self.prepacked = TritonInt8Weight(self.weight.data)
            if not self.is_tied:
                self.weight.data = self.weight.data.new_empty(0, self.weight.shape[1])
            return
        self.quantized = Int8Weight(self.weight.data, self.int8_activations)
        if self.batch_invariant:
            return
        if self.quantized.max_rows is None:
            if not self.is_tied:
                self.weight.data = self.weight.data.new_empty(0, self.weight.shape[1])
        else:
            self.prepacked = TransposedProductWeight(self.weight.data)
