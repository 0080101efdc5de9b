"""The hand-off from the scheduler to the model runner: what to compute this step, one comment per field."""
from __future__ import annotations

from dataclasses import dataclass, field

from ember.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    request_id: str
    # The tokens whose K/V this step computes: all_token_ids[start_position : start_position + len], then
    # the last num_spec_tokens are proposed tokens (speculative decoding) to verify.
    token_ids: list[int]
    # Position of token_ids[0] in the sequence (= the request's num_computed_tokens before the step).
    start_position: int
    # Every block the request holds, in order; covers start_position + len(token_ids) tokens.
    block_ids: list[int]
    # True when this step reaches the end of the request's known tokens, so a next token is sampled.
    # False for the non-final chunks of a chunked prefill.
    do_sample: bool
    params: SamplingParams
    # The request's prompt and output so far (shared lists, read-only) for penalties and min_tokens.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Proposed tokens at the end of token_ids: the runner samples a token after each of the last
    # num_spec_tokens + 1 positions and keeps the proposals the model agrees with.
    num_spec_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    # Requests in batch order; the runner flattens their token_ids into one ragged batch.
    requests: list[ScheduledRequest] = field(default_factory=list)
    # Requests that finished or were aborted since the last step: the runner drops their state
    # (seeded generators).
    finished_request_ids: set[str] = field(default_factory=set)
    # Requests preempted this step (their blocks were freed; they will be recomputed).
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests
