"""Verification of proposed tokens (speculative decoding) against the target model, by the rejection rule.

A request with k proposed tokens d_1..d_k has k + 1 rows of logits: after its last accepted token and after
each proposal. With a proposal that is one token for certain (n-gram lookup: q is one-hot on d_j), the rule
of Leviathan et al. / Chen et al. is: keep d_j with probability p_j(d_j); at the first rejection, draw from
the residual max(p_j - q_j, 0), i.e. p_j without d_j, renormalized; if all k are kept, draw one more token
from p_{k+1}. The output is then distributed exactly as token-by-token sampling of the target model. Greedy
keeps d_j iff it is the argmax, so greedy outputs equal non-speculative decoding token for token.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ember.runner.sampler import race, sampling_probs

if TYPE_CHECKING:
    from ember.engine.scheduler_output import ScheduledRequest


def verify_proposals(
    logits: torch.Tensor,  # [sum(num_spec_tokens + 1), vocab_size], each request's rows in order
    requests: list["ScheduledRequest"],
    generators: list[torch.Generator | None],
) -> list[list[int]]:
    """Per request: the accepted proposals followed by one token sampled by the target (1 to k + 1 tokens)."""
    logits = logits.float()
    argmax = logits.argmax(dim=-1).tolist()
    results, row = [], 0
    for request, generator in zip(requests, generators):
        num_spec = request.num_spec_tokens
        proposals = request.token_ids[len(request.token_ids) - num_spec:]
        rows = slice(row, row + num_spec + 1)
        if request.params.is_greedy:
            results.append(_verify_greedy(proposals, argmax[rows]))
        else:
            results.append(_verify_random(proposals, logits[rows], request, generator))
        row += num_spec + 1
    return results


def _verify_greedy(proposals: list[int], targets: list[int]) -> list[int]:
    accepted = []
    for proposal, target in zip(proposals, targets):
        if proposal != target:
            break
        accepted.append(proposal)
    return accepted + [targets[len(accepted)]]


def _verify_random(proposals: list[int], logits: torch.Tensor, request, generator: torch.Generator | None) -> list[int]:
    probs = sampling_probs(logits, [request] * logits.shape[0])  # [k + 1, vocab_size]
    probs = probs / probs.sum(dim=-1, keepdim=True)
    uniforms = torch.rand(len(proposals), generator=generator, device=logits.device).tolist()
    accepted = []
    for j, proposal in enumerate(proposals):
        if uniforms[j] < probs[j, proposal].item():
            accepted.append(proposal)
            continue
        residual = probs[j].clone()
        residual[proposal] = 0.0
        return accepted + race(residual[None], [generator]).tolist()
    return accepted + race(probs[len(proposals)][None], [generator]).tolist()
