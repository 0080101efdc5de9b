"""Ollama wire format (docs/api.md): /api/generate and /api/chat requests and `options`, NDJSON chunks, errors.

Defaults follow Ollama's documented ones (temperature 0.8, top_k 40, top_p 0.9, num_predict -1 = up to
the context), except the repeat penalty: Ember's covers the whole context rather than the last 64 tokens,
so it is off unless asked for. Options that only tune resources (num_ctx, num_thread, num_gpu, ...) are
accepted and have no effect; sampling options Ember lacks are accepted only at their neutral value.
`format` is "json" (any JSON object) or a JSON schema (structured outputs).
"""
from __future__ import annotations

import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams, StructuredOutputsParams
from ember.server.editor import EditorCompletion, FimRequest
from ember.server.serving import InvalidRequestError, Serving, ServingError, constraint_names, reject_unsupported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Options(_Strict):
    # sampling
    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None  # deprecated by Ollama; no effect
    # resources: accepted, no effect (the context and threads are fixed when the server starts)
    num_ctx: int | None = None
    num_keep: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None


class _GenerateFields(_Strict):
    model: str
    options: Options | None = None
    format: Any = None  # "" / null: free text; "json"; or a JSON schema
    stream: bool = True
    keep_alive: float | str | None = None  # the model stays loaded anyway
    think: bool | str | None = None  # only false / null
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling_params(self, serving: Serving) -> SamplingParams:
        o = self.options or Options()
        penalty = o.repeat_penalty
        reject_unsupported({
            "think": (self.think, (None, False)),
            "options.typical_p": (o.typical_p, (None, 1.0)),
            "options.tfs_z": (o.tfs_z, (None, 1.0)),
            "options.mirostat": (o.mirostat, (None, 0)),
            # Ember's penalties see the whole context; a window only matters when a penalty is on
            "options.repeat_last_n": (o.repeat_last_n if penalty not in (None, 1.0) else None, (None, -1)),
        })
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = None if o.num_predict is None or o.num_predict in (-1, -2) else o.num_predict
        return serving.sampling_params(
            {
                "max_tokens": "options.num_predict", "temperature": "options.temperature", "top_k": "options.top_k",
                "top_p": "options.top_p", "min_p": "options.min_p", "repetition_penalty": "options.repeat_penalty",
                "presence_penalty": "options.presence_penalty", "frequency_penalty": "options.frequency_penalty",
                "stop": "options.stop", "logprobs": "top_logprobs",
            },
            max_tokens=max_tokens,
            temperature=0.8 if o.temperature is None else o.temperature,
            top_k=40 if o.top_k is None else o.top_k,
            top_p=0.9 if o.top_p is None else o.top_p,
            min_p=o.min_p or 0.0,
            seed=o.seed if o.seed is not None and o.seed >= 0 else None,
            stop=o.stop or [],
            repetition_penalty=1.0 if penalty is None else penalty,
            presence_penalty=o.presence_penalty or 0.0,
            frequency_penalty=o.frequency_penalty or 0.0,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            structured_outputs=self._structured_outputs(),
        )

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return Serving.structured_outputs("format", json_object=True)
        if not isinstance(self.format, dict):
            raise InvalidRequestError(f'format must be "json" or a JSON schema object, got {self.format!r}', param="format")
        return Serving.structured_outputs("format", json=self.format)

    @property
    def param_names(self) -> dict[str, str]:
        return constraint_names("format")

    @property
    def explicit_max_tokens(self) -> int | None:
        n = self.options.num_predict if self.options else None
        return n if n is not None and n > 0 else None


class GenerateRequest(_GenerateFields):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None  # set: fill-in-the-middle through the editor path (`fim_request`)
    template: str | None = None  # only "" / null: the model's own template is used
    context: list[int] | None = None
    raw: bool = False
    images: list | None = None  # only empty

    def check(self) -> None:
        reject_unsupported({
            "template": (self.template, (None, "")),
            "images": (self.images or None, (None,)),
        })
        if self.suffix and self.format not in (None, ""):  # the editor path trims its text, which would break a structure
            raise InvalidRequestError("format cannot be combined with suffix", param="format")


    def fim_request(self, params: SamplingParams) -> FimRequest:
        """`prompt` is the text before the cursor, `suffix` the text after (no chat template, as Ollama)."""
        return FimRequest(prefix=self.prompt or "", suffix=self.suffix or "", params=params)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list | None = None  # only empty
    tool_calls: list | None = None  # only empty
    thinking: str | None = None  # earlier reasoning; not fed back to the model

    def as_template_message(self) -> dict:
        reject_unsupported({"images": (self.images or None, (None,)), "tool_calls": (self.tool_calls or None, (None,))})
        return {"role": self.role, "content": self.content}


class ChatRequest(_GenerateFields):
    messages: list[Message] = []
    tools: list | None = None  # only empty

    def check(self) -> None:
        reject_unsupported({"tools": (self.tools or None, (None,))})


class ShowRequest(_Strict):
    model: str | None = None
    name: str | None = None  # older clients' name for `model`
    verbose: bool | None = None


# ---- responses -----------------------------------------------------------------------------------
def now() -> str:
    """RFC 3339 with fractional seconds, as Ollama writes `created_at`."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def logprobs(c: CompletionOutput, start: int) -> list[dict] | None:
    if c.logprobs is None:
        return None

    def entry(lp) -> dict:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode("utf-8"))}

    return [{**entry(entries[0]), "top_logprobs": [entry(e) for e in entries[1:]]} for entries in c.logprobs[start:]]


def final_fields(output: RequestOutput, end_time: float) -> dict:
    """The counters and durations (nanoseconds) of a finished response."""
    c = output.outputs[0]
    arrival = output.metrics.get("arrival_time", end_time)
    first_token = output.metrics.get("first_token_time") or end_time
    return {
        "done": True,
        "done_reason": c.finish_reason or "stop",
        "total_duration": int((end_time - arrival) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": len(output.prompt_token_ids),
        "prompt_eval_duration": int((first_token - arrival) * 1e9),
        "eval_count": len(c.token_ids),
        "eval_duration": int((end_time - first_token) * 1e9),
    }


def fim_final_fields(completion: EditorCompletion) -> dict:
    """`final_fields` for an editor completion (generate with `suffix`)."""
    return {
        "done": True,
        "done_reason": completion.finish_reason or "stop",
        "total_duration": int((completion.prompt_ms + completion.predicted_ms) * 1e6),
        "load_duration": 0,
        "prompt_eval_count": completion.num_prompt_tokens,
        "prompt_eval_duration": int(completion.prompt_ms * 1e6),
        "eval_count": completion.num_output_tokens,
        "eval_duration": int(completion.predicted_ms * 1e6),
    }


def error_body(err: ServingError) -> dict:
    return {"error": err.message}
