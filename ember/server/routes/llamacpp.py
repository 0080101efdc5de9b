"""llama.cpp's native completion route: POST /completion (and its alias /completions), a plain completion
with llama.cpp's options, `grammar` and `json_schema` included; streamed as SSE. (/infill, an editor route,
lives in completion.py.)"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ember.server.protocol.llamacpp import CompletionRequest, CompletionResult, completion_chunk, completion_response, error_body
from ember.server.serving import Serving, cancel_on_disconnect, event_stream, sse

router = APIRouter(tags=["llama.cpp"])


@router.post("/completion")
@router.post("/completions")
@cancel_on_disconnect
async def completion(request: CompletionRequest, raw_request: Request):
    serving: Serving = raw_request.app.state.serving
    params = request.sampling_params()
    if isinstance(request.prompt, str):
        prompt, token_ids = request.prompt, await serving.encode(request.prompt)
    else:
        serving.check_token_ids(request.prompt)
        prompt, token_ids = serving.decode(request.prompt, skip_special_tokens=False), list(request.prompt)
    serving.check_context(len(token_ids), request.n_predict if request.n_predict > 0 else None, "n_predict")
    stream = await serving.generate(token_ids, params, prompt, param_names=request.param_names)
    result = CompletionResult()
    generates = request.n_predict != 0  # 0: only compute the prompt into the cache
    if not request.stream:
        async for output in stream:
            result.update(output, time.monotonic(), generates)
        return completion_response(result, request, params, serving.model_name, prompt)

    async def events() -> AsyncIterator[dict]:
        async for output in stream:
            result.update(output, time.monotonic(), generates)
            delta = output.outputs[0].text_delta if generates else ""
            if delta:
                yield completion_chunk(result, delta)
        yield completion_response(result, request, params, serving.model_name, prompt)

    return event_stream(events(), sse, error_body)
