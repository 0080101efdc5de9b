"""What the engine hands back: RequestOutput with one CompletionOutput per sample, and finish reasons."""
from __future__ import annotations

from dataclasses import dataclass, field

FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context length
FINISH_ABORT = "abort"  # cancelled by the caller
FINISH_ERROR = "error"  # the engine failed on this request alone (RequestOutput.error says why)


@dataclass
class Logprob:
    token_id: int
    logprob: float
    token: str  # the token's text as decoded alone


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # One entry per generated token: the sampled token first, then the top alternatives.
    logprobs: list[list[Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    text_delta: str = ""  # text added since the previous output of this request (streaming)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # set (and finished) when the engine failed on this request; other requests go on
