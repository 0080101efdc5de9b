"""Editor routes: llama.cpp /infill, FauxPilot/Copilot /v1/engines/{engine}/completions and its token stub,
Mistral/Continue /v1/fim/completions; plus the fill-in-the-middle and Tabby branches of /v1/completions
(called from routes/openai.py). Each translates its wire format to one `FimRequest` for `EditorService`."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ember.server.editor import EditorCompletion, EditorService
from ember.server.protocol import llamacpp, mistral, tabby
from ember.server.protocol.copilot import COPILOT_TOKEN, CopilotCompletionRequest
from ember.server.protocol.openai import (
    CompletionRequest,
    error_body,
    fim_completion_chunk,
    fim_completion_response,
    fim_usage_chunk,
)
from ember.server.serving import Serving, cancel_on_disconnect, event_stream, sse

router = APIRouter(tags=["Editors"])
# Requests with the same key belong to one editor session: a newer one supersedes the older.
SESSION_HEADER = "X-Ember-Session"
# Every editor answer says how its prompt was built: "fim" (the model's FIM tokens) or "prefix" (the model
# has none: the prefix alone, with the suffix used to stop and trim).
FIM_MODE_HEADER = "X-Ember-FIM-Mode"
DONE = "data: [DONE]\n\n"


def _serving(raw_request: Request) -> Serving:
    return raw_request.app.state.serving


def _editor(raw_request: Request) -> EditorService:
    return raw_request.app.state.editor


def _session(raw_request: Request) -> str | None:
    return raw_request.headers.get(SESSION_HEADER) or None


def _answer(raw_request: Request, body: dict | Response) -> Response:
    response = body if isinstance(body, Response) else JSONResponse(body)
    response.headers[FIM_MODE_HEADER] = _editor(raw_request).fim_mode
    return response


async def _collect(completion: EditorCompletion) -> EditorCompletion:
    try:
        async for _ in completion:
            pass
    finally:
        await completion.aclose()
    return completion


# ---- llama.cpp ------------------------------------------------------------------------------------
@router.post("/infill")
@cancel_on_disconnect
async def infill(request: llamacpp.InfillRequest, raw_request: Request):
    serving = _serving(raw_request)
    fim = request.to_fim_request(_session(raw_request))
    completion = await _editor(raw_request).complete(fim)
    if not request.stream:
        await _collect(completion)
        return _answer(raw_request, llamacpp.completion_response(completion, request, fim.params, serving.model_name))

    async def events() -> AsyncIterator[dict]:
        try:
            async for delta in completion:
                yield llamacpp.completion_chunk(completion, delta)
            yield llamacpp.completion_response(completion, request, fim.params, serving.model_name)
        finally:
            await completion.aclose()

    return _answer(raw_request, event_stream(events(), sse, llamacpp.error_body))


# ---- OpenAI-shaped: /v1/completions with suffix, FauxPilot / Copilot -----------------------------------
async def openai_fim_completion(request: CompletionRequest, raw_request: Request):
    """/v1/completions with `suffix` (called by routes/openai.py)."""
    serving = _serving(raw_request)
    fim = request.fim_request(serving, _session(raw_request))
    return await _text_completion(raw_request, fim, request.stream, request.include_usage)


@router.post("/v1/engines/{engine}/completions")
@cancel_on_disconnect
async def engine_completion(engine: str, request: CopilotCompletionRequest, raw_request: Request):
    """FauxPilot's and Copilot's route: any engine name is the served model."""
    fim = request.to_fim_request(_session(raw_request))
    return await _text_completion(raw_request, fim, request.stream, include_usage=False)


@router.get("/copilot_internal/v2/token")
async def copilot_token():
    """The stub token FauxPilot serves, so Copilot clients pointed here start without GitHub."""
    return COPILOT_TOKEN


async def _text_completion(raw_request: Request, fim, stream: bool, include_usage: bool):
    model = _serving(raw_request).model_name
    completion = await _editor(raw_request).complete(fim)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not stream:
        await _collect(completion)
        return _answer(raw_request, fim_completion_response(completion, response_id, created, model))

    async def events() -> AsyncIterator[dict]:
        try:
            async for delta in completion:
                yield fim_completion_chunk(response_id, created, model, delta)
            yield fim_completion_chunk(response_id, created, model, "", completion.finish_reason, completion.stop_word)
            if include_usage:
                yield fim_usage_chunk(completion, response_id, created, model)
        finally:
            await completion.aclose()

    return _answer(raw_request, event_stream(events(), sse, error_body, trailer=DONE))


# ---- Mistral / Continue -------------------------------------------------------------------------
@router.post("/v1/fim/completions")
@cancel_on_disconnect
async def fim_completion(request: mistral.FimCompletionRequest, raw_request: Request):
    # No model check: Continue sends the name it was configured with (e.g. "codestral-latest").
    model = _serving(raw_request).model_name
    completion = await _editor(raw_request).complete(request.to_fim_request(_session(raw_request)))
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not request.stream:
        await _collect(completion)
        return _answer(raw_request, mistral.fim_response(completion, response_id, created, model))

    async def events() -> AsyncIterator[dict]:
        try:
            is_first = True
            async for delta in completion:
                yield mistral.fim_chunk(response_id, created, model, delta, is_first=is_first)
                is_first = False
            yield mistral.fim_chunk(response_id, created, model, "", is_first=is_first, completion=completion)
        finally:
            await completion.aclose()

    return _answer(raw_request, event_stream(events(), sse, error_body, trailer=DONE))


# ---- Tabby --------------------------------------------------------------------------------------
async def tabby_completion(body: dict, raw_request: Request):
    """/v1/completions with Tabby's `segments` (called by routes/openai.py); Tabby does not stream."""
    request = tabby.TabbyCompletionRequest.model_validate(body)
    completion = await _editor(raw_request).complete(request.to_fim_request(_session(raw_request)))
    await _collect(completion)
    return _answer(raw_request, tabby.completion_response(completion, f"cmpl-{uuid.uuid4().hex}"))
