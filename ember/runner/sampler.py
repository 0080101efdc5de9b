"""Batched sampling: grammar bitmasks, penalties, min_tokens, greedy, temperature, top-k, top-p, min-p, seeds, logprobs.

Every operation is row-wise, so a request's token does not depend on what else is in the batch; a
seeded request draws from its own generator, so the same seed gives the same text in any batch.
Sampling uses the exponential race (argmax of p / q, q ~ Exp(1)) instead of torch.multinomial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # the runner reads the engine's hand-off by duck typing; no import at run time
    from ember.engine.scheduler_output import ScheduledRequest


@dataclass
class SampledToken:
    token_id: int
    # (token id, logprob) of the sampled token first, then the top alternatives; None if not asked.
    logprobs: list[tuple[int, float]] | None = None


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    def __call__(
        self,
        logits: torch.Tensor,  # [num_reqs, vocab_size] float32
        requests: list["ScheduledRequest"],
        generators: list[torch.Generator | None],
        bitmasks: list[torch.Tensor | None] | None = None,  # per request: int32 [ceil(vocab_size / 32)] or None
        on_sampled: Callable[[torch.Tensor], None] | None = None,  # given the ids on the device, before the host reads them
    ) -> list[SampledToken]:
        logits = logits.float()
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [num_reqs, vocab_size]
        logits = logits.clone()
        constrained = [i for i, bitmask in enumerate(bitmasks or []) if bitmask is not None]
        if constrained:
            apply_token_bitmasks(logits, constrained, torch.stack([bitmasks[i] for i in constrained]))
        for i, request in enumerate(requests):
            if request.params.has_penalties:
                apply_penalties(logits[i], request)
            # The grammar decides where a constrained output may end.
            is_constrained = bitmasks is not None and bitmasks[i] is not None
            is_short = len(request.output_token_ids) < request.params.min_tokens
            if is_short and not is_constrained:
                banned = list(request.params.stop_token_ids) + ([] if request.params.ignore_eos else self.eos_token_ids)
                logits[i, banned] = float("-inf")

        random_rows = [i for i, r in enumerate(requests) if not r.params.is_greedy]
        token_ids = logits.argmax(dim=-1)  # [num_reqs]; the random rows are overwritten
        if random_rows:
            token_ids[random_rows] = sample_random(
                logits[random_rows], [requests[i] for i in random_rows], [generators[i] for i in random_rows]
            )

        token_id_list = to_host(token_ids, on_sampled)
        results = []
        for i, request in enumerate(requests):
            num_top = request.params.logprobs
            logprobs = None
            if num_top is not None:
                row = raw_logprobs[i]
                logprobs = [(token_id_list[i], row[token_id_list[i]].item())]
                if num_top > 0:
                    values, ids = row.topk(num_top)
                    logprobs += list(zip(ids.tolist(), values.tolist()))
            results.append(SampledToken(token_id_list[i], logprobs))
        return results


def to_host(token_ids: torch.Tensor, on_sampled: Callable[[torch.Tensor], None] | None) -> list[int]:
    """The ids as a host list, with `on_sampled(token_ids)` called first. On a GPU the ids' copy to the host is
    queued before what on_sampled launches, so reading them waits for this step's work alone."""
    if on_sampled is None or not token_ids.is_cuda:
        if on_sampled is not None:
            on_sampled(token_ids)
        return token_ids.tolist()
    host_ids = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
    host_ids.copy_(token_ids, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    on_sampled(token_ids)
    copied.synchronize()
    return host_ids.tolist()


def apply_token_bitmasks(logits: torch.Tensor, rows: list[int], bitmasks: torch.Tensor) -> None:
    """Sets logits[rows[j], t] to -inf where bit t of bitmasks[j] is clear (bit t % 32 of word t // 32)."""
    vocab_size = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bitmasks = bitmasks.to(logits.device)
    allowed = ((bitmasks.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()  # [len(rows), 32 * words]
    if allowed.shape[1] < vocab_size:  # tokens past the mask's end are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab_size], float("-inf"))


def apply_penalties(logits: torch.Tensor, request: "ScheduledRequest") -> None:
    """OpenAI presence/frequency penalties on output tokens; HF repetition penalty on prompt + output."""
    params = request.params
    vocab_size = logits.shape[0]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(request.prompt_token_ids + request.output_token_ids, dtype=torch.long,
                            device=logits.device).unique()
        seen = seen[seen < vocab_size]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if request.output_token_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device),
                                minlength=vocab_size)
        counts = counts[:vocab_size].to(logits.dtype)  # [vocab_size]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def sample_random(
    logits: torch.Tensor,  # [num_reqs, vocab_size]
    requests: list["ScheduledRequest"],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    return race(sampling_probs(logits, requests), generators)


def race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:  # [num_reqs] int64
    """One draw per row of `probs` ([num_reqs, vocab_size], rows need not sum to 1): argmax of p / q, q ~ Exp(1)."""
    q = torch.empty_like(probs)
    for i, generator in enumerate(generators):
        q[i].exponential_(generator=generator)
    return (probs / q).argmax(dim=-1)


def sampling_probs(
    logits: torch.Tensor,  # [num_reqs, vocab_size]
    requests: list["ScheduledRequest"],
) -> torch.Tensor:  # [num_reqs, vocab_size]: temperature, top-k, top-p and min-p applied (unnormalized after the cuts)
    temperatures = torch.tensor([r.params.temperature for r in requests], dtype=logits.dtype, device=logits.device)
    logits = logits / temperatures.unsqueeze(1)
    top_ks = [r.params.top_k for r in requests]
    if any(top_ks):
        vocab_size = logits.shape[1]
        k = torch.tensor([k if 0 < k < vocab_size else vocab_size for k in top_ks], device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))  # [num_reqs, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    top_ps = torch.tensor([r.params.top_p for r in requests], dtype=probs.dtype, device=probs.device)
    if (top_ps < 1).any():
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_ps.unsqueeze(1)
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_ps = torch.tensor([r.params.min_p for r in requests], dtype=probs.dtype, device=probs.device)
    if (min_ps > 0).any():
        threshold = min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs
