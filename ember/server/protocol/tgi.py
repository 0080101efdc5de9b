"""Hugging Face TGI wire format: /generate, /generate_stream and the compatibility body of POST /.

Field names, defaults and the error shape (`{"error", "error_type"}`, validation errors as 422) follow
TGI's docs/openapi.json. Parameters TGI has but Ember does not implement are accepted only at their
neutral value (`typical_p`, `watermark`, `decoder_input_details`, `adapter_id`, `best_of`). `grammar` is
TGI's `{"type", "value"}`: "json" (alias "json_object"; a schema, or its text), "json_schema" (`{"name",
"schema"}`) or "regex".
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams, StructuredOutputsParams
from ember.server.serving import InvalidRequestError, Serving, ServingError, constraint_names, reject_unsupported

FINISH_REASONS = {"length": "length", "abort": "length"}  # "stop" splits into eos_token / stop_sequence


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Grammar(_Strict):
    type: Literal["json", "json_object", "json_schema", "regex"]
    value: Any

    def structured_outputs(self) -> StructuredOutputsParams:
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise InvalidRequestError("grammar of type regex needs a string value", param="grammar")
            return Serving.structured_outputs("grammar", regex=self.value)
        if self.type == "json_schema":  # TGI's JsonSchemaConfig: an optional name and the schema
            if not isinstance(self.value, dict) or "schema" not in self.value:
                raise InvalidRequestError('grammar of type json_schema needs a value {"name", "schema"}', param="grammar")
            return Serving.structured_outputs("grammar", json=self.value["schema"])
        return Serving.structured_outputs("grammar", json=self.value)


class GenerateParameters(_Strict):
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: int | None = 100  # TGI's default
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = []
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


class GenerateRequest(_Strict):
    inputs: str
    parameters: GenerateParameters = GenerateParameters()
    stream: bool = False  # only read by POST /

    def sampling_params(self, serving: Serving) -> SamplingParams:
        p = self.parameters
        if p.best_of is not None and p.best_of > 1:
            raise InvalidRequestError("best_of > 1 is not supported: use n on /v1/completions instead", param="best_of")
        reject_unsupported({
            "decoder_input_details": (p.decoder_input_details, (False,)),
            "typical_p": (p.typical_p, (None, 1.0)),
            "watermark": (p.watermark, (False,)),
            "adapter_id": (p.adapter_id, (None, "")),
        })
        if p.temperature is not None and p.temperature <= 0:
            raise InvalidRequestError("temperature must be strictly positive", param="temperature")
        if p.max_new_tokens is not None and p.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be strictly positive", param="max_new_tokens")
        if not self.inputs:
            raise InvalidRequestError("inputs cannot be empty", param="inputs")
        # As TGI: sample when asked to, or when any sampling warper is set; otherwise greedy.
        sample = p.do_sample or p.temperature not in (None, 1.0) or p.top_k is not None or p.top_p not in (None, 1.0)
        logprobs = p.top_n_tokens if p.top_n_tokens else (0 if p.details else None)
        return serving.sampling_params(
            {"logprobs": "top_n_tokens", "max_tokens": "max_new_tokens"},
            max_tokens=p.max_new_tokens,
            temperature=(p.temperature or 1.0) if sample else 0.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k or 0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            seed=p.seed,
            stop=p.stop,
            logprobs=logprobs,
            structured_outputs=p.grammar.structured_outputs() if p.grammar else None,
        )

    @property
    def param_names(self) -> dict[str, str]:
        return constraint_names("grammar")

    async def prompt_token_ids(self, serving: Serving) -> list[int]:
        token_ids = await serving.encode(self.inputs, param="inputs")
        truncate = self.parameters.truncate
        if truncate is not None and truncate < 1:
            raise InvalidRequestError(f"parameters.truncate must be at least 1, got {truncate}", param="parameters.truncate")
        if truncate:
            token_ids = token_ids[-truncate:]
        return token_ids


def finish_reason(c: CompletionOutput) -> str:
    if c.finish_reason == "stop":
        return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"
    return FINISH_REASONS.get(c.finish_reason, "length")


def token(serving: Serving, c: CompletionOutput, i: int, text: str) -> dict:
    token_id = c.token_ids[i]
    logprob = c.logprobs[i][0].logprob if c.logprobs else None
    return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in serving.tokenizer.eos_token_ids}


def top_tokens(serving: Serving, c: CompletionOutput, i: int) -> list[dict]:
    eos = serving.tokenizer.eos_token_ids
    return [
        {"id": e.token_id, "text": e.token, "logprob": e.logprob, "special": e.token_id in eos}
        for e in c.logprobs[i][1:]
    ]


def generate_response(serving: Serving, request: GenerateRequest, output: RequestOutput, want_details: bool) -> dict:
    c = output.outputs[0]
    text = request.inputs + c.text if request.parameters.return_full_text else c.text
    body = {"generated_text": text}
    if want_details:
        tokens = [token(serving, c, i, serving.decode([t], skip_special_tokens=False)) for i, t in enumerate(c.token_ids)]
        body["details"] = {
            "finish_reason": finish_reason(c),
            "generated_tokens": len(c.token_ids),
            "seed": request.parameters.seed,
            "prefill": [],
            "tokens": tokens,
        }
        if request.parameters.top_n_tokens:
            body["details"]["top_tokens"] = [top_tokens(serving, c, i) for i in range(len(c.token_ids))]
    return body


def error_body(err: ServingError) -> dict:
    return {"error": err.message, "error_type": ERROR_TYPES.get(err.status_code, "generation")}


def status_code(err: ServingError) -> int:
    """TGI answers validation errors with 422 (its clients read `error_type`); the rest keep their status."""
    return 422 if err.status_code == 400 else err.status_code


ERROR_TYPES = {400: "validation", 401: "authentication", 403: "authentication", 404: "validation", 408: "validation",
               413: "validation", 415: "validation", 503: "overloaded", 500: "generation"}
