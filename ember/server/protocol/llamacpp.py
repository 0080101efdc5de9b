"""llama.cpp wire format: POST /completion (a plain completion, with `grammar` / `json_schema` for
structured output) and POST /infill as llama.vim and llama.vscode send it, both answered in /completion's shape.

Matched against ggml-org/llama.cpp tools/server/README.md (/completion and /infill options, response
fields) and tools/server/server-task.cpp (`to_json_non_oaicompat` of the final and partial results,
`result_timings::to_json`, `json_get_nested_values` for `response_fields`), and against the bodies sent by
ggml-org/llama.vim autoload/llama.vim (`llama#fim`, `s:ring_update`) and ggml-org/llama.vscode
src/llama-server.ts (`createRequestPayload`).

Unknown fields are ignored: these clients track llama.cpp's server, which grows new fields often and itself
ignores what it does not know. Sampling fields Ember lacks are accepted only at their neutral value (400 otherwise).
`samplers` is honoured as llama.cpp reads it, a list of the samplers that run (llama.vim's
["top_k", "top_p", "infill"] runs no temperature and no min_p sampler); its order is not (Ember's is fixed),
nor is the `infill` sampler. `response_fields` selects and flattens the answer's fields as llama.cpp does.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams, StructuredOutputsParams
from ember.server.editor import FimRequest
from ember.server.serving import InvalidRequestError, Serving, ServingError, constraint_names, reject_unsupported

# llama.cpp's /completion defaults (README): the editors above override top_k and top_p, not temperature.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05

# llama.cpp's names (and one-letter codes) for the samplers Ember has, from common_sampler_types_from_names/_chars
SAMPLER_NAMES = {
    "top_k": "top_k", "top-k": "top_k", "k": "top_k",
    "top_p": "top_p", "top-p": "top_p", "nucleus": "top_p", "p": "top_p",
    "min_p": "min_p", "min-p": "min_p", "m": "min_p",
    "temperature": "temperature", "temp": "temperature", "t": "temperature",
}
STOP_TYPES = {"stop": "eos", "length": "limit"}  # "stop" with a stop word is "word"; anything else "none"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error", 429: "unavailable_error",
               500: "server_error", 503: "unavailable_error"}


class _Lenient(BaseModel):
    # Clients of llama.cpp's server send fields of newer server versions; llama.cpp ignores unknown ones too.
    model_config = ConfigDict(extra="ignore")


class ExtraChunk(_Lenient):
    """One `input_extra` entry: a chunk of another file (llama.vim adds `time`, ignored with the rest)."""

    filename: str = ""
    text: str = ""


class LoraAdapter(_Lenient):
    id: int
    scale: float


class _Options(_Lenient):
    """The generation options /completion and /infill share."""

    n_predict: int = -1  # -1: unlimited; 0: only evaluate the prompt into the cache
    stream: bool = False
    stop: list[str] = []
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int = -1  # -1: random
    repeat_penalty: float = 1.0
    repeat_last_n: int | None = None  # llama.cpp's default: 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    # Accepted, no effect:
    t_max_prompt_ms: float = 0  # llama.vim: "not yet supported" by llama.cpp either
    cache_prompt: bool = True  # Ember's prefix cache is always on
    samplers: list[str] | str | None = None  # which samplers run (see `_enabled`); their order is Ember's own
    id_slot: int = -1  # llama.cpp's slot choice; Ember has no slots
    n_keep: int = 0  # what to keep on a context shift; Ember does not shift the context
    min_keep: int = 0
    dry_base: float | None = None  # these tune samplers that are off at their neutral values below
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    xtc_threshold: float | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dynatemp_exponent: float | None = None
    # Selects which response fields come back: applied by `completion_response`.
    response_fields: list[str] | None = None
    # Structured output (/completion only: see `InfillRequest`): a GBNF grammar or a JSON schema.
    grammar: str | None = None
    json_schema: dict | None = None
    # Only at their neutral values: behaviour Ember does not implement.
    n_probs: int = 0
    post_sampling_probs: bool = False
    return_tokens: bool = False
    n_cmpl: int = 1
    typical_p: float = 1.0
    mirostat: int = 0
    dynatemp_range: float = 0.0
    dry_multiplier: float = 0.0
    xtc_probability: float = 0.0
    logit_bias: list | dict | None = None
    lora: list[LoraAdapter] | None = None
    timings_per_token: bool = False
    return_progress: bool = False

    def sampling_params(self) -> SamplingParams:
        reject_unsupported({
            "n_probs": (self.n_probs, (0,)),
            "post_sampling_probs": (self.post_sampling_probs, (False,)),
            "return_tokens": (self.return_tokens, (False,)),
            "n_cmpl": (self.n_cmpl, (1,)),
            "typical_p": (self.typical_p, (1.0,)),
            "mirostat": (self.mirostat, (0,)),
            "dynatemp_range": (self.dynatemp_range, (0.0,)),
            "dry_multiplier": (self.dry_multiplier, (0.0,)),
            "xtc_probability": (self.xtc_probability, (0.0,)),
            "logit_bias": (self.logit_bias or None, (None,)),
            "lora": ([a for a in self.lora or [] if a.scale != 0] or None, (None,)),
            "timings_per_token": (self.timings_per_token, (False,)),
            "return_progress": (self.return_progress, (False,)),
            # Ember's repeat penalty covers the whole context (llama.cpp's -1)
            "repeat_last_n": (self.repeat_last_n if self.repeat_penalty != 1.0 else None, (None, -1)),
        })
        if self.n_predict < -1:
            raise InvalidRequestError(f"n_predict must be -1 (unlimited) or at least 0, got {self.n_predict}", param="n_predict")
        enabled = self._enabled()
        return Serving.sampling_params(
            {"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty"},
            # n_predict 0 generates nothing; SamplingParams needs a positive limit all the same
            max_tokens=1 if self.n_predict == 0 else (None if self.n_predict == -1 else self.n_predict),
            # a sampler left out of `samplers` does not run: no temperature sampler samples at temperature 1
            temperature=(DEFAULT_TEMPERATURE if self.temperature is None else max(self.temperature, 0.0))
            if "temperature" in enabled else 1.0,
            top_k=(DEFAULT_TOP_K if self.top_k is None else max(self.top_k, 0)) if "top_k" in enabled else 0,
            top_p=(DEFAULT_TOP_P if self.top_p is None else self.top_p) if "top_p" in enabled else 1.0,
            min_p=(DEFAULT_MIN_P if self.min_p is None else self.min_p) if "min_p" in enabled else 0.0,
            repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed < 0 else self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            structured_outputs=self._structured_outputs(),
        )

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        grammar = self.grammar or None
        if grammar is not None and self.json_schema is not None:  # as llama.cpp
            raise InvalidRequestError("Either json_schema or grammar can be specified, but not both", param="grammar")
        if grammar is not None:
            return Serving.structured_outputs("grammar", grammar=grammar)
        if self.json_schema is not None:
            return Serving.structured_outputs("json_schema", json=self.json_schema)
        return None

    @property
    def param_names(self) -> dict[str, str]:
        return constraint_names("grammar" if self.grammar else "json_schema" if self.json_schema is not None else None)

    def _enabled(self) -> set[str]:
        """The samplers Ember has that this request runs: all unless `samplers` names them (as names, or as
        llama.cpp's one-letter codes). Others (dry, typ_p, xtc, infill, ...) are off in Ember whatever the list."""
        if self.samplers is None:
            return set(SAMPLER_NAMES.values())
        names = list(self.samplers) if isinstance(self.samplers, str) else self.samplers
        return {SAMPLER_NAMES[n] for n in names if n in SAMPLER_NAMES}


class CompletionRequest(_Options):
    """POST /completion: a plain completion of `prompt` (text, or token ids; no chat template)."""

    prompt: str | list[int]
    n_indent: int = 0  # only 0: line-indent stops belong to the editor path (/infill)
    t_max_predict_ms: float = 0  # only 0: likewise

    def sampling_params(self) -> SamplingParams:
        reject_unsupported({
            "n_indent": (self.n_indent, (0,)),
            "t_max_predict_ms": (self.t_max_predict_ms, (0, 0.0)),
        })
        return super().sampling_params()


class InfillRequest(_Options):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []
    prompt: str = ""  # the current line up to the cursor: it follows input_prefix
    n_indent: int = 0
    t_max_predict_ms: float = 0  # 0: no limit

    def to_fim_request(self, session_key: str | None = None) -> FimRequest:
        """`session_key`: the `X-Ember-Session` header (llama.cpp has no session field)."""
        # The editor path trims completions and answers typed-ahead requests from an earlier generation:
        # either would break a structure, so constrained output is /completion's alone.
        reject_unsupported({"grammar": (self.grammar or None, (None,)), "json_schema": (self.json_schema, (None,))})
        params = self.sampling_params()
        return FimRequest(
            prefix=self.input_prefix + self.prompt,
            suffix=self.input_suffix,
            params=params,
            extra_files=[(c.filename, c.text) for c in self.input_extra],
            session_key=session_key or None,
            max_predict_ms=self.t_max_predict_ms if self.t_max_predict_ms > 0 else None,
            n_indent=max(self.n_indent, 0),
            warm_only=self.n_predict == 0,
        )


# ---- responses ----------------------------------------------------------------------------------
@dataclass
class CompletionResult:
    """What an answer reports, as its text grows and once it is done. An `EditorCompletion` (/infill) has
    the same fields; `from_output` fills them for /completion."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | ...
    stop_word: str | None = None  # the stop string that ended it, if one did
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    is_truncated: bool = False
    prompt_ms: float = 0.0  # from arrival to the first token
    predicted_ms: float = 0.0  # from the first token to the end

    def update(self, output: RequestOutput, now: float, generates: bool = True) -> None:
        """Takes in the engine's latest output (`now`: time.monotonic()); `generates` False for n_predict 0,
        whose one token only served to compute the prompt."""
        c = output.outputs[0]
        arrival = output.metrics.get("arrival_time", now)
        first_token = output.metrics.get("first_token_time") or now
        self.text = c.text if generates else ""
        self.finish_reason = c.finish_reason
        self.stop_word = c.stop_reason if isinstance(c.stop_reason, str) else None
        self.num_prompt_tokens = len(output.prompt_token_ids)
        self.num_cached_tokens = output.num_cached_tokens
        self.num_output_tokens = len(c.token_ids) if generates else 0
        self.prompt_ms = max(0.0, first_token - arrival) * 1e3
        self.predicted_ms = max(0.0, now - first_token) * 1e3


def stop_type(c: CompletionResult) -> str:
    if c.finish_reason == "stop" and c.stop_word:
        return "word"
    return STOP_TYPES.get(c.finish_reason, "none")


def timings(c: CompletionResult) -> dict:
    num_computed = c.num_prompt_tokens - c.num_cached_tokens
    return {
        "cache_n": c.num_cached_tokens,
        "prompt_n": num_computed,
        "prompt_ms": c.prompt_ms,
        "prompt_per_token_ms": c.prompt_ms / num_computed if num_computed else 0.0,
        "prompt_per_second": 1e3 * num_computed / c.prompt_ms if c.prompt_ms > 0 else 0.0,
        "predicted_n": c.num_output_tokens,
        "predicted_ms": c.predicted_ms,
        "predicted_per_token_ms": c.predicted_ms / c.num_output_tokens if c.num_output_tokens else 0.0,
        "predicted_per_second": 1e3 * c.num_output_tokens / c.predicted_ms if c.predicted_ms > 0 else 0.0,
    }


def generation_settings(request: CompletionRequest | InfillRequest, params: SamplingParams, model: str) -> dict:
    """The options in effect, as llama.cpp echoes them (the subset Ember has)."""
    settings = {
        "model": model,
        "n_predict": request.n_predict,
        "seed": request.seed,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "repeat_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "stop": params.stop,
        "ignore_eos": params.ignore_eos,
        "n_indent": max(request.n_indent, 0),
        "t_max_predict_ms": request.t_max_predict_ms,
        "stream": request.stream,
    }
    if request.grammar:
        settings["grammar"] = request.grammar
    return settings


def completion_response(
    result: CompletionResult, request: CompletionRequest | InfillRequest, params: SamplingParams, model: str, prompt: str = ""
) -> dict:
    """The whole answer, or with `request.stream` the final event (its text already went out in chunks).
    `prompt`: the rendered prompt, if the caller has it (llama.cpp echoes it)."""
    body = {
        "index": 0,
        "content": "" if request.stream else result.text,
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": model,
        "tokens_predicted": result.num_output_tokens,
        "tokens_evaluated": result.num_prompt_tokens,
        "generation_settings": generation_settings(request, params, model),
        "prompt": prompt,
        "has_new_line": "\n" in result.text,
        "truncated": result.is_truncated,
        "stop_type": stop_type(result),
        "stopping_word": result.stop_word or "",
        "tokens_cached": result.num_prompt_tokens + result.num_output_tokens,  # llama.cpp: the slot's n_past
        "timings": timings(result),
    }
    if request.response_fields:
        return select_fields(body, request.response_fields)
    return body


def completion_chunk(result: CompletionResult, delta: str) -> dict:
    """One streamed delta (counts as they stand when it is sent)."""
    return {
        "index": 0,
        "content": delta,
        "tokens": [],
        "stop": False,
        "id_slot": 0,
        "tokens_predicted": result.num_output_tokens,
        "tokens_evaluated": result.num_prompt_tokens,
    }


def select_fields(body: dict, paths: list[str]) -> dict:
    """llama.cpp's `response_fields`: each "a/b" path that exists becomes a top-level key named "a/b"."""
    selected = {}
    for path in paths:
        value, found = body, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            selected[path] = value
    return selected


def error_body(err: ServingError) -> dict:
    return {"error": {"code": err.status_code, "message": err.message, "type": ERROR_TYPES.get(err.status_code, "server_error")}}
