"""One request's state as the scheduler and engine see it: its tokens, how many are computed, its status."""
from __future__ import annotations

import enum
import time

from ember.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its blocks freed; recomputed when rescheduled
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed alone; its blocks leave the prefix cache

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    """A single sequence. `n > 1` requests are split into one Request per sample by the engine."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        priority: int = 0,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)  # prompt + output, appended in place
        self.params = params
        self.max_tokens = max_tokens  # resolved against the context length
        self.priority = priority  # lower runs first
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V sit in the cache
        self.num_cached_tokens = 0  # of the prompt, served from the prefix cache at first scheduling
        self.num_preemptions = 0
        self.scheduled_time: float | None = None  # when first scheduled (queue time = this - arrival)
        self.stop_reason: str | int | None = None
        # Proposed next tokens (speculative decoding), verified by the next step: scheduled after all_token_ids,
        # never part of them until accepted.
        self.spec_token_ids: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def sort_key(self) -> tuple:
        return (self.priority, self.arrival_time)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
