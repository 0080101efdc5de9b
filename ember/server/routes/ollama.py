"""Ollama routes: /api/generate and /api/chat (NDJSON streaming by default), /api/tags, /api/show,
/api/ps, /api/version."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ember import __version__
from ember.server.protocol.ollama import (
    ChatRequest,
    GenerateRequest,
    ShowRequest,
    error_body,
    final_fields,
    fim_final_fields,
    logprobs,
    now,
)
from ember.server.serving import InvalidRequestError, Serving, cancel_on_disconnect, event_stream

router = APIRouter(tags=["Ollama"])


def _serving(raw_request: Request) -> Serving:
    return raw_request.app.state.serving


def _ndjson(event: dict) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n"


@router.post("/api/generate")
@cancel_on_disconnect
async def generate(request: GenerateRequest, raw_request: Request):
    serving = _serving(raw_request)
    serving.check_model(request.model, allow_tag=True)
    request.check()
    params = request.sampling_params(serving)
    if not request.prompt and not request.context:  # Ollama's way to load a model: answer at once
        return {"model": request.model, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
    if request.suffix:
        return await _insert(request, params, raw_request)
    if request.raw:
        prompt, token_ids = request.prompt or "", await serving.encode(request.prompt or "")
    else:
        messages = ([{"role": "system", "content": request.system}] if request.system else [])
        messages.append({"role": "user", "content": request.prompt or ""})
        prompt, token_ids = await serving.chat_prompt(messages)
    if request.context:
        serving.check_token_ids(request.context, "context")
        token_ids = list(request.context) + token_ids
    serving.check_context(len(token_ids), request.explicit_max_tokens, "options.num_predict")
    stream = await serving.generate(token_ids, params, prompt, param_names=request.param_names)

    def final(output, text: str) -> dict:
        body = {"model": request.model, "created_at": now(), "response": text}
        body.update(final_fields(output, time.monotonic()))
        body["context"] = list(output.prompt_token_ids) + list(output.outputs[0].token_ids)
        return body

    return await _respond(request, stream, "response", final)


@router.post("/api/chat")
@cancel_on_disconnect
async def chat(request: ChatRequest, raw_request: Request):
    serving = _serving(raw_request)
    serving.check_model(request.model, allow_tag=True)
    request.check()
    params = request.sampling_params(serving)
    if not request.messages:  # loads the model, as Ollama does
        return {
            "model": request.model, "created_at": now(), "message": {"role": "assistant", "content": ""},
            "done": True, "done_reason": "load",
        }
    prompt, token_ids = await serving.chat_prompt([m.as_template_message() for m in request.messages])
    serving.check_context(len(token_ids), request.explicit_max_tokens, "options.num_predict", "messages")
    stream = await serving.generate(token_ids, params, prompt, param_names=request.param_names)

    def final(output, text: str) -> dict:
        body = {"model": request.model, "created_at": now(), "message": {"role": "assistant", "content": text}}
        body.update(final_fields(output, time.monotonic()))
        return body

    return await _respond(request, stream, "message", final)


async def _insert(request: GenerateRequest, params, raw_request: Request):
    """Fill-in-the-middle (Ollama's "insert"): the editor path, answered in /api/generate's shape."""
    completion = await raw_request.app.state.editor.complete(request.fim_request(params))

    def final(text: str) -> dict:
        return {"model": request.model, "created_at": now(), "response": text, **fim_final_fields(completion)}

    if not request.stream:
        try:
            async for _ in completion:
                pass
        finally:
            await completion.aclose()
        return final(completion.text)

    async def chunks() -> AsyncIterator[dict]:
        try:
            async for delta in completion:
                yield {"model": request.model, "created_at": now(), "response": delta, "done": False}
            yield final("")
        finally:
            await completion.aclose()

    return event_stream(chunks(), _ndjson, error_body, "application/x-ndjson")


async def _respond(request, stream, field: str, final):
    """NDJSON lines as the text comes (Ollama's default), or one object at the end with `stream: false`."""
    if request.stream:
        return event_stream(_chunks(request.model, stream, field, final), _ndjson, error_body, "application/x-ndjson")
    output = None
    async for output in stream:
        pass
    body = final(output, output.outputs[0].text)
    if request.logprobs:
        body["logprobs"] = logprobs(output.outputs[0], 0)
    return body


async def _chunks(model: str, stream, field: str, final) -> AsyncIterator[dict]:
    """One line per piece of text, then a last line with `done: true` and the counters."""
    num_sent = 0
    async for output in stream:
        c = output.outputs[0]
        if c.text_delta:
            content = c.text_delta if field == "response" else {"role": "assistant", "content": c.text_delta}
            event = {"model": model, "created_at": now(), field: content, "done": False}
            if c.logprobs is not None:
                event["logprobs"] = logprobs(c, num_sent)
                num_sent = len(c.token_ids)
            yield event
        if output.finished:
            yield final(output, "")


# ---- models ----------------------------------------------------------------------------------------
def _details(serving: Serving) -> dict:
    model = serving.engine.engine.runner.model
    family = type(model).__name__.removesuffix("ForCausalLM").lower()
    num_params = sum(p.numel() for p in model.parameters())
    return {
        "parent_model": "",
        "format": "gguf" if serving.model_path.endswith(".gguf") else "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": _human(num_params),
        "quantization_level": str(serving.engine.engine.runner.dtype).removeprefix("torch.").upper() if not serving.model_path.endswith(".gguf") else "",
    }


def _human(num: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num >= scale:
            return f"{num / scale:.3g}{unit}"
    return str(num)


def _model_entry(serving: Serving) -> dict:
    path = serving.model_path
    size = _size(path)
    mtime = os.path.getmtime(path) if os.path.exists(path) else serving.created
    # An identifier of this model file, not a hash of its bytes (which would take seconds for large models).
    digest = hashlib.sha256(f"{path}:{size}:{mtime}".encode()).hexdigest()
    modified = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).isoformat()
    return {"name": serving.model_name, "model": serving.model_name, "modified_at": modified, "size": size, "digest": digest, "details": _details(serving)}


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    return os.path.getsize(path) if os.path.exists(path) else 0


@router.get("/api/tags")
async def tags(raw_request: Request):
    return {"models": [_model_entry(_serving(raw_request))]}


@router.get("/api/ps")
async def ps(raw_request: Request):
    serving = _serving(raw_request)
    entry = _model_entry(serving)
    entry.pop("modified_at")
    entry["expires_at"] = "2100-01-01T00:00:00Z"  # loaded for the server's lifetime
    entry["size_vram"] = 0 if serving.engine.engine.runner.device.type == "cpu" else entry["size"]
    entry["context_length"] = serving.max_model_len
    return {"models": [entry]}


@router.post("/api/show")
async def show(request: ShowRequest, raw_request: Request):
    serving = _serving(raw_request)
    name = request.model or request.name
    if not name:
        raise InvalidRequestError("model is required", param="model")
    serving.check_model(name, allow_tag=True)
    entry = _model_entry(serving)
    details = entry["details"]
    return {
        "modelfile": f"FROM {serving.model_file_name}\n",
        "parameters": "",
        "template": serving.tokenizer.chat_template or "",
        "details": details,
        "model_info": {
            "general.architecture": details["family"],
            "general.parameter_count": sum(p.numel() for p in serving.engine.engine.runner.model.parameters()),
            f"{details['family']}.context_length": serving.max_model_len,
        },
        # "insert": /api/generate takes `suffix` for every model (prefix-only without FIM tokens)
        "capabilities": ["completion", "insert"],
        "modified_at": entry["modified_at"],
    }


@router.get("/api/version")
async def version():
    return {"version": __version__}
