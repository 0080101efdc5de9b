"""TGI routes: POST /generate, POST /generate_stream, GET /info, and POST / (TGI's compatibility body or
the `{"prompt"}` body of the FastAPI demo in the Qwen deployment guide)."""
from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError

from ember import __version__
from ember.sampling_params import SamplingParams
from ember.server.protocol.tgi import GenerateRequest, error_body, finish_reason, generate_response, token, top_tokens
from ember.server.serving import InvalidRequestError, Serving, cancel_on_disconnect, event_stream

router = APIRouter(tags=["TGI"])


def _serving(raw_request: Request) -> Serving:
    return raw_request.app.state.serving


def _tgi_sse(event: dict) -> str:
    return f"data:{json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"


@router.post("/generate")
@cancel_on_disconnect
async def generate(request: GenerateRequest, raw_request: Request):
    return await _generate(_serving(raw_request), request)


@router.post("/generate_stream")
@cancel_on_disconnect
async def generate_stream(request: GenerateRequest, raw_request: Request):
    return await _generate_stream(_serving(raw_request), request)


async def _start(serving: Serving, request: GenerateRequest):
    params = request.sampling_params(serving)
    token_ids = await request.prompt_token_ids(serving)
    explicit_max = request.parameters.max_new_tokens if "max_new_tokens" in request.parameters.model_fields_set else None
    serving.check_context(len(token_ids), explicit_max, "max_new_tokens", "inputs")
    return token_ids, await serving.generate(token_ids, params, request.inputs, param_names=request.param_names)


async def _generate(serving: Serving, request: GenerateRequest) -> dict:
    _, stream = await _start(serving, request)
    final = None
    async for final in stream:
        pass
    return generate_response(serving, request, final, request.parameters.details)


async def _generate_stream(serving: Serving, request: GenerateRequest):
    token_ids, stream = await _start(serving, request)
    return event_stream(_stream_events(serving, request, len(token_ids), stream), _tgi_sse, error_body)


async def _stream_events(serving: Serving, request: GenerateRequest, num_prompt_tokens: int, stream) -> AsyncIterator[dict]:
    """One event per generated token; the last carries the full text and the details, as TGI sends them."""
    p = request.parameters
    num_sent = 0
    async for output in stream:
        c = output.outputs[0]
        for i in range(num_sent, len(c.token_ids)):
            is_last = i == len(c.token_ids) - 1
            event = {"index": i + 1, "token": token(serving, c, i, c.text_delta if is_last else "")}
            if p.top_n_tokens:
                event["top_tokens"] = top_tokens(serving, c, i)
            event["generated_text"] = None
            event["details"] = None
            if is_last and c.finished:
                event["generated_text"] = request.inputs + c.text if p.return_full_text else c.text
                if p.details:
                    event["details"] = {
                        "finish_reason": finish_reason(c),
                        "generated_tokens": len(c.token_ids),
                        "seed": p.seed,
                        "input_length": num_prompt_tokens,
                    }
            yield event
        num_sent = len(c.token_ids)


@router.get("/info")
async def info(raw_request: Request):
    serving = _serving(raw_request)
    config, runner = serving.engine.engine.config, serving.engine.engine.runner
    return {
        "model_id": serving.model_name,
        "model_sha": None,
        "model_dtype": str(runner.dtype).removeprefix("torch."),
        "model_device_type": runner.device.type,
        "kernels": serving.engine.engine.kernel_variant,  # Ember's: the CPU kernel variant, "triton" or "reference"
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": config.scheduler.max_num_seqs + serving.config.max_queued_requests,
        "max_best_of": 1,
        "max_stop_sequences": None,  # no limit
        "max_input_tokens": serving.max_model_len - 1,
        "max_total_tokens": serving.max_model_len,
        "max_batch_size": config.scheduler.max_num_seqs,
        "max_batch_total_tokens": config.scheduler.max_num_batched_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "ember",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }


class QwenDemoRequest(BaseModel):
    """The body of the FastAPI demo in the Qwen deployment guide."""

    model_config = ConfigDict(extra="forbid")
    prompt: str


# The demo's max_new_tokens; greedy, so the same prompt gets the same answer (the demo's sampling comes from
# each model's generation_config.json, which a GGUF does not carry).
QWEN_DEMO_SAMPLING = dict(max_tokens=512, temperature=0.0)


@router.post("/")
@cancel_on_disconnect
async def compat_generate(raw_request: Request, body: dict = Body(...)):
    """TGI's `{"inputs", "parameters", "stream"}` (a one-element list, or SSE when streaming), or the Qwen
    demo's `{"prompt"}` answered as `{"response", "status", "time"}` with the chat template applied."""
    serving = _serving(raw_request)
    if "inputs" in body:
        request = _validate(GenerateRequest, body)
        if request.stream:
            return await _generate_stream(serving, request)
        return [await _generate(serving, request)]
    if "prompt" in body:
        request = _validate(QwenDemoRequest, body)
        _, token_ids = await serving.chat_prompt([{"role": "user", "content": request.prompt}])
        serving.check_context(len(token_ids), None, prompt_param="prompt")
        final = await serving.generate_final(token_ids, SamplingParams(**QWEN_DEMO_SAMPLING))
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return {"response": final.outputs[0].text, "status": 200, "time": now}
    raise InvalidRequestError('expected a TGI body {"inputs", "parameters"} or {"prompt"}', param="inputs")


def _validate(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as exc:  # rendered by the app's one validation-error handler
        raise RequestValidationError(exc.errors()) from exc
