"""Token embedding and the LM head (which may share the embedding's weight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden_size]
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden -> float32 logits through its quant method; with `tied_to`, it reuses the embedding's parameter
    instead of owning one (and the method keeps that plain matrix)."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: torch.dtype, method, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.method = method
        self.output_sizes = [vocab_size]
        self.is_tied = tied_to is not None
        method.create_weights(self, hidden_size, vocab_size, False, dtype)
        if tied_to is not None:
            self.weight = tied_to.weight

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [num_seqs, hidden] -> [num_seqs, vocab]
        return self.method.apply(self, hidden_states).float()
