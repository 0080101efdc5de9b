"""Dense linear: the plain GEMM and a batch-invariant variant whose rows do not depend on the batch size."""
import torch
import torch.nn.functional as F

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
