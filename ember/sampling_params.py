"""SamplingParams: how one request is sampled and when it stops, validated once at construction."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# seed: torch's generators take any integer in [-2**63, 2**64); children of an n > 1 request wrap within it.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number
FLOAT32_MAX = 3.4028234663852886e38
_MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy (vLLM's _SAMPLING_EPS)


@dataclass
class StructuredOutputsParams:
    """Constrains the output to a JSON schema, any JSON object, a regex, one of some strings, or a grammar
    (GBNF/EBNF, llama.cpp's dialect). Exactly one is set. Field names follow vLLM's `StructuredOutputsParams`."""

    json: dict | str | None = None  # a JSON schema (dict or its text)
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        _check(len(kinds) == 1, "structured_outputs", f"needs exactly one of json, json_object, regex, choice, grammar; got {kinds or 'none'}")
        if self.choice is not None:
            _check(
                isinstance(self.choice, list) and self.choice and all(isinstance(c, str) and c for c in self.choice),
                "structured_outputs.choice", "must be a non-empty list of non-empty strings",
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise InvalidParameterError("structured_outputs.json", f"is not valid JSON: {exc}") from None
        _check(self.json is None or isinstance(self.json, (dict, bool)), "structured_outputs.json", "must be a JSON schema object")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): the compiled-grammar cache key."""
        if self.json is not None:
            return "json", json.dumps(self.json, sort_keys=True)
        if self.json_object:
            return "json_object", ""
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        return ("regex", self.regex) if self.regex is not None else ("grammar", self.grammar)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives per sampled token (0: only the sampled one)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # None: unconstrained

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value), name, f"must be a finite number, got {value!r}")
        _check(self.seed is None or MIN_SEED <= self.seed <= MAX_SEED, "seed",
               f"must fit in 64 bits ([{MIN_SEED}, {MAX_SEED}]), got {self.seed}")
        _check(all(isinstance(s, str) for s in self.stop), "stop", "must be strings")
        # Values float32 cannot tell from 0 are the limit they approach (vLLM's rule for temperature).
        if 0 < self.temperature < _MIN_TEMPERATURE:
            self.temperature = 0.0  # greedy
        if 0 < self.top_p < FLOAT32_TINY:
            self.top_p = FLOAT32_TINY  # the top token only
        _check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", f"must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens", f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}",
        )
        _check(self.temperature >= 0, "temperature", f"must be non-negative, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be -1 (disabled) or at least 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX, "repetition_penalty",
               f"must be positive and within float32's range [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}], got {self.repetition_penalty}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", f"must be in [0, 20], got {self.logprobs}")
        _check(all(s for s in self.stop), "stop", "stop strings must be non-empty")

    def child_seed(self, index: int) -> int | None:
        """The seed of sample `index` of an n > 1 request: seed + index, wrapped into the 64-bit range."""
        if self.seed is None:
            return None
        seed = self.seed + index
        return seed if seed <= MAX_SEED else seed - 2**64

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


class InvalidParameterError(ValueError):
    """A request parameter is out of range; `param` names it (the server turns this into a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(param, message)
