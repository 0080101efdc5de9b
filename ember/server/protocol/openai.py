"""OpenAI wire format: /v1/completions and /v1/chat/completions requests, responses, chunks and errors.

Field names follow the OpenAI API reference, plus vLLM's sampling extensions (top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos, ...). Unknown fields are a 400; fields that
exist in the API but that Ember does not implement are accepted only at their neutral value.
A completion with `suffix` is fill-in-the-middle: it becomes a `FimRequest` (`fim_request`) and its answer
an `EditorCompletion`, rendered by `fim_completion_response` / `fim_completion_chunk`.
Structured output (`response_format`, vLLM's `structured_outputs` and older `guided_*`, and chat `tools`)
becomes one `StructuredOutputsParams`: more than one constraint in a request is a 400.
"""
from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ember.outputs import CompletionOutput, Logprob
from ember.sampling_params import SamplingParams, StructuredOutputsParams
from ember.server.editor import EditorCompletion, FimRequest
from ember.server.protocol.openai_tools import Tool, ToolChoice, template_tools, tool_schema
from ember.tokenizer import FimTemplate
from ember.server.serving import InvalidRequestError, Serving, ServingError, constraint_names, reject_unsupported


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output follows the schema exactly either way


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsFields(_Strict):
    """vLLM's `structured_outputs` request field (the part of it Ember implements)."""

    json_: dict | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id; no effect on generation
    logit_bias: dict[str, float] | None = None  # only empty
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0  # lower runs first
    # structured output: OpenAI's response_format (vLLM takes it on completions too), vLLM's structured_outputs
    # and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _constraints(self) -> list[tuple[str, dict]]:
        """(the client's field, StructuredOutputsParams fields) for each constraint the request sets."""
        found = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequestError('response_format of type "json_schema" needs json_schema.schema', param="response_format")
            found.append(("response_format", {"json": rf.json_schema.schema_}))
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(exclude_none=True)
            fields = {("json" if k == "json_" else k): v for k, v in fields.items() if v is not False}
            found.append(("structured_outputs", fields))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                found.append((f"guided_{kind}", {kind: value}))
        return found

    def _structured_outputs(self, extra: list[tuple[str, dict]] = ()) -> StructuredOutputsParams | None:
        found = self._constraints() + list(extra)
        if len(found) > 1:
            raise InvalidRequestError(
                f"only one constraint on the output is allowed per request; got {', '.join(name for name, _ in found)}",
                param=found[1][0],
            )
        if not found:
            return None
        name, fields = found[0]
        return Serving.structured_outputs(name, **fields)

    def _constraint_field(self) -> str | None:
        found = self._constraints()
        return found[0][0] if found else None

    @property
    def param_names(self) -> dict[str, str]:
        """For `Serving.generate`: a constraint that does not compile is named as the client sent it."""
        return constraint_names(self._constraint_field())

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        reject_unsupported({"logit_bias": (self.logit_bias, (None, {}))})

    def _sampling_params(
        self, serving: Serving, max_tokens: int | None, logprobs: int | None, names: dict,
        structured_outputs: StructuredOutputsParams | None,
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Serving.sampling_params(  # static: `serving` may be None in pure translation
            names,
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured_outputs,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# ---- completions ---------------------------------------------------------------------------------
class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16  # OpenAI's default for completions; null: up to the context length
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None  # only equal to n
    suffix: str | None = None  # set: fill-in-the-middle, served through `fim_request`

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or token ids."""
        if not self.prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def sampling_params(self, serving: Serving) -> SamplingParams:
        self._check_common()
        reject_unsupported({"best_of": (self.best_of, (None, self.n))})
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError(
                "echo together with logprobs would need the prompt's logprobs, which this server does not compute; "
                "drop one of them", param="echo",
            )
        return self._sampling_params(serving, self.max_tokens, self.logprobs, {}, self._structured_outputs())

    def fim_request(self, serving: Serving, session_key: str | None = None) -> FimRequest:
        """The fill-in-the-middle request of a completion with `suffix`; `session_key` (a header) wins over `user`."""
        if self.suffix is None:
            raise InvalidRequestError("fill-in-the-middle needs suffix", param="suffix")
        if not isinstance(self.prompt, str):
            raise InvalidRequestError("with suffix, prompt must be a single string", param="prompt")
        if self.n != 1:
            raise InvalidRequestError(f"with suffix, n must be 1 (got {self.n})", param="n")
        reject_unsupported({
            "echo": (self.echo, (False,)),  # OpenAI: echo cannot be combined with suffix
            "logprobs": (self.logprobs, (None,)),  # editor completions carry no logprobs
        })
        found = self._constraints()
        if found:  # the editor trims its completions (at lines, at the suffix), which would break a structure
            raise InvalidRequestError(f"{found[0][0]} cannot be combined with suffix", param=found[0][0])
        return FimRequest(
            prefix=self.prompt,
            suffix=self.suffix,
            params=self.sampling_params(serving),
            session_key=session_key or self.user,
        )


def completion_logprobs(output: CompletionOutput, start: int, text_offset: int) -> dict | None:
    """OpenAI's legacy logprobs object for output tokens [start:], offsets counted from `text_offset`."""
    if output.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entries in output.logprobs[start:]:
        sampled = entries[0]
        tokens.append(sampled.token)
        token_logprobs.append(sampled.logprob)
        top = {e.token: e.logprob for e in entries[1:]}
        top.setdefault(sampled.token, sampled.logprob)
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(sampled.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def fim_completion_response(completion: EditorCompletion, response_id: str, created: int, model: str) -> dict:
    """A whole `text_completion` answer of one editor completion (also FauxPilot's / Copilot's shape)."""
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "text": completion.text,
            "logprobs": None,
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_word,
        }],
        "usage": usage(completion.num_prompt_tokens, completion.num_output_tokens, completion.num_cached_tokens),
        "system_fingerprint": None,
    }


def fim_completion_chunk(
    response_id: str, created: int, model: str, text: str, finish_reason: str | None = None, stop_reason: str | None = None
) -> dict:
    """One streamed `text_completion` chunk: a delta, or (with `finish_reason`) the last, usually empty one."""
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason}],
    }


def fim_usage_chunk(completion: EditorCompletion, response_id: str, created: int, model: str) -> dict:
    """The usage chunk after the last choice chunk, when `stream_options.include_usage` asked for it."""
    return {
        "id": response_id, "object": "text_completion", "created": created, "model": model, "choices": [],
        "usage": usage(completion.num_prompt_tokens, completion.num_output_tokens, completion.num_cached_tokens),
    }


# ---- chat completions ----------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an earlier answer's calls, replayed
    tool_call_id: str | None = None  # a `tool` message: the call it answers

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role  # `developer` is the newer name for `system`
        message = {"role": role, "content": content or ""}
        if self.tool_calls:
            # Hugging Face templates read the arguments as a mapping, as vLLM passes them
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(call: ToolCall) -> dict | str:
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # with tools: "required", a named function or "none" ("auto" is a 400)
    parallel_tool_calls: bool | None = None  # false: "required" makes exactly one call
    store: bool | None = None  # stored completions are an OpenAI platform feature; no effect here
    metadata: dict | None = None
    service_tier: str | None = None
    add_generation_prompt: bool = True  # vLLM's

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]

    def template_variables(self) -> dict:
        return template_tools(self.tools)

    @property
    def tool_function(self) -> str | None | bool:
        """False: a plain answer; else the output is tool calls, all to this function (None: any of tools)."""
        schema, name = tool_schema(self.tools or [], self.tool_choice, self.parallel_tool_calls)
        return False if schema is None else name

    def _constraint_field(self) -> str | None:
        return super()._constraint_field() or ("tools" if self.tool_function is not False else None)

    def sampling_params(self, serving: Serving) -> SamplingParams:
        self._check_common()
        schema, _ = tool_schema(self.tools or [], self.tool_choice, self.parallel_tool_calls)
        tools = [("tools", {"json": schema})] if schema is not None else []
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        names = {"logprobs": "top_logprobs", "max_tokens": self.max_tokens_param}
        return self._sampling_params(serving, self.requested_max_tokens, logprobs, names, self._structured_outputs(tools))


def chat_logprobs(output: CompletionOutput, start: int) -> dict | None:
    """The chat `logprobs` object for output tokens [start:]."""
    if output.logprobs is None:
        return None

    def entry(lp: Logprob) -> dict:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode("utf-8"))}

    content = []
    for entries in output.logprobs[start:]:
        item = entry(entries[0])
        item["top_logprobs"] = [entry(e) for e in entries[1:]]
        content.append(item)
    return {"content": content}


# ---- shared response pieces ----------------------------------------------------------------------
def usage(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int | None = None) -> dict:
    body = {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }
    if num_cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": num_cached_tokens}
    return body


def error_body(err: ServingError) -> dict:
    return {"error": {"message": err.message, "type": err.error_type, "param": err.param, "code": err.code}}


def models_list(serving: Serving, fim_template: FimTemplate | None = None) -> dict:
    """The served model; `fim` says whether it has fill-in-the-middle tokens (else editor completions are
    prefix-only) and which family's template they follow."""
    return {
        "object": "list",
        "data": [{
            "id": serving.model_name,
            "object": "model",
            "created": serving.created,
            "owned_by": "ember",
            "root": serving.model_file_name,
            "parent": None,
            "max_model_len": serving.max_model_len,
            "fim": {"supported": fim_template is not None, "template": fim_template.family if fim_template else None},
        }],
    }
