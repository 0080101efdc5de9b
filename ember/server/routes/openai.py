"""OpenAI routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as SSE)."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ember.server.protocol.openai_tools import ToolCallReader
from ember.server.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    models_list,
    usage,
)
from ember.server.routes import completion
from ember.server.serving import Serving, cancel_on_disconnect, event_stream, merge_streams, sse

router = APIRouter(tags=["OpenAI"])
DONE = "data: [DONE]\n\n"


def _serving(raw_request: Request) -> Serving:
    return raw_request.app.state.serving


@router.get("/v1/models")
async def list_models(raw_request: Request):
    return models_list(_serving(raw_request), raw_request.app.state.editor.template)


@router.post("/v1/completions")
@cancel_on_disconnect
async def create_completion(body: Annotated[dict, Body()], raw_request: Request):
    # One path, two wire formats: Tabby's body has `segments`; OpenAI's with `suffix` is fill-in-the-middle.
    try:
        if "segments" in body:
            return await completion.tabby_completion(body, raw_request)
        request = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    if request.suffix is not None:
        return await completion.openai_fim_completion(request, raw_request)
    serving = _serving(raw_request)
    serving.check_model(request.model)
    params = request.sampling_params(serving)
    explicit_max = request.max_tokens if "max_tokens" in request.model_fields_set else None
    prompts: list[tuple[str, list[int]]] = []
    for prompt in request.prompts():
        if isinstance(prompt, str):
            token_ids = await serving.encode(prompt)
        else:
            serving.check_token_ids(prompt)
            token_ids, prompt = list(prompt), serving.decode(prompt, skip_special_tokens=False) if request.echo else None
        serving.check_context(len(token_ids), explicit_max)
        prompts.append((prompt, token_ids))
    streams = []
    try:
        for text, token_ids in prompts:
            streams.append(await serving.generate(token_ids, params, text, request.priority, request.param_names))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    response_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if request.stream:
        chunks = _completion_chunks(serving, request, prompts, streams, response_id, created)
        return event_stream(chunks, sse, error_body, trailer=DONE)

    finals = [None] * len(streams)
    async for index, output in merge_streams(streams):
        finals[index] = output
    choices = []
    for i, output in enumerate(finals):
        echo = prompts[i][0] if request.echo else ""
        for c in output.outputs:
            choices.append({
                "index": i * params.n + c.index,
                "text": echo + c.text,
                "logprobs": completion_logprobs(c, 0, len(echo)),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
    num_prompt = sum(len(o.prompt_token_ids) for o in finals)
    num_completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": serving.model_name,
        "choices": choices,
        "usage": usage(num_prompt, num_completion, sum(o.num_cached_tokens for o in finals)),
        "system_fingerprint": None,
    }


async def _completion_chunks(serving: Serving, request: CompletionRequest, prompts, streams, response_id, created) -> AsyncIterator[dict]:
    n = request.n
    include_usage = request.include_usage

    def chunk(index: int, text: str, logprobs=None, finish_reason=None, stop_reason=None) -> dict:
        body = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": serving.model_name,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}],
        }
        if include_usage:
            body["usage"] = None
        return body

    num_sent_tokens: dict[int, int] = {}
    num_sent_chars: dict[int, int] = {}
    finished: set[int] = set()
    if request.echo:
        for i, (text, _) in enumerate(prompts):
            for j in range(n):
                num_sent_chars[i * n + j] = len(text)
                yield chunk(i * n + j, text)
    async for i, output in merge_streams(streams):
        for c in output.outputs:
            index = i * n + c.index
            if index in finished or not (c.text_delta or c.finished):
                continue
            start = num_sent_tokens.get(index, 0)
            offset = num_sent_chars.get(index, 0)
            yield chunk(index, c.text_delta, completion_logprobs(c, start, offset), c.finish_reason, c.stop_reason)
            num_sent_tokens[index] = len(c.token_ids)
            num_sent_chars[index] = offset + len(c.text_delta)
            if c.finished:
                finished.add(index)
    if include_usage:
        num_prompt = sum(len(token_ids) for _, token_ids in prompts)
        yield {
            "id": response_id, "object": "text_completion", "created": created, "model": serving.model_name,
            "choices": [], "usage": usage(num_prompt, sum(num_sent_tokens.values())),
        }


@router.post("/v1/chat/completions")
@cancel_on_disconnect
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    serving = _serving(raw_request)
    serving.check_model(request.model)
    params = request.sampling_params(serving)
    prompt, token_ids = await serving.chat_prompt(request.template_messages(), request.add_generation_prompt, **request.template_variables())
    serving.check_context(len(token_ids), request.requested_max_tokens, request.max_tokens_param, "messages")
    stream = await serving.generate(token_ids, params, prompt, request.priority, request.param_names)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if request.stream:
        chunks = _chat_chunks(serving, request, len(token_ids), stream, response_id, created)
        return event_stream(chunks, sse, error_body, trailer=DONE)

    final = None
    async for final in stream:
        pass
    tool_function = request.tool_function
    choices = [{
        "index": c.index,
        "message": _message(c.text, tool_function),
        "logprobs": chat_logprobs(c, 0),
        "finish_reason": _finish_reason(c.finish_reason, tool_function),
        "stop_reason": c.stop_reason,
    } for c in final.outputs]
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": serving.model_name,
        "choices": choices,
        "usage": usage(len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs), final.num_cached_tokens),
        "system_fingerprint": None,
    }


def _message(text: str, tool_function: str | None | bool) -> dict:
    """The assistant message: the text, or the tool calls read off it (the text itself if none could be read,
    as when cut off before the first call's name)."""
    if tool_function is False:
        return {"role": "assistant", "content": text}
    reader = ToolCallReader(tool_function)
    reader.feed(text)
    if not reader.calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": None, "tool_calls": reader.calls}


def _finish_reason(reason: str | None, tool_function: str | None | bool) -> str | None:
    """"tool_calls" for calls that ran to their end; a cut-off one keeps "length"."""
    return "tool_calls" if tool_function is not False and reason == "stop" else reason


async def _chat_chunks(serving: Serving, request: ChatCompletionRequest, num_prompt_tokens: int, stream, response_id, created) -> AsyncIterator[dict]:
    include_usage = request.include_usage

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> dict:
        body = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": serving.model_name,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}],
        }
        if include_usage:
            body["usage"] = None
        return body

    tool_function = request.tool_function
    for index in range(request.n):  # the role comes first, before any token, as OpenAI sends it
        yield chunk(index, {"role": "assistant", "content": "" if tool_function is False else None})
    num_sent_tokens: dict[int, int] = {}
    finished: set[int] = set()
    readers = {} if tool_function is False else {i: ToolCallReader(tool_function) for i in range(request.n)}
    async for output in stream:
        for c in output.outputs:
            if c.index in finished:
                continue
            start = num_sent_tokens.get(c.index, 0)
            if c.index in readers:
                entries = readers[c.index].feed(c.text_delta)
                if entries:
                    yield chunk(c.index, {"tool_calls": entries}, chat_logprobs(c, start))
                    num_sent_tokens[c.index] = start = len(c.token_ids)
            elif c.text_delta:
                yield chunk(c.index, {"content": c.text_delta}, chat_logprobs(c, start))
                num_sent_tokens[c.index] = start = len(c.token_ids)
            if c.finished:
                reason = _finish_reason(c.finish_reason, tool_function)
                yield chunk(c.index, {}, chat_logprobs(c, start) if start < len(c.token_ids) else None, reason, c.stop_reason)
                num_sent_tokens[c.index] = len(c.token_ids)
                finished.add(c.index)
    if include_usage:
        yield {
            "id": response_id, "object": "chat.completion.chunk", "created": created, "model": serving.model_name,
            "choices": [], "usage": usage(num_prompt_tokens, sum(num_sent_tokens.values())),
        }
