"""POST /tokenize and POST /detokenize, in vLLM's shape ({"prompt"} or {"messages"}); POST /tokenize also
takes TGI's `{"inputs"}` and answers with TGI's list of `{id, text, start, stop}`."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError

from ember.server.protocol.openai import ChatMessage
from ember.server.serving import InvalidRequestError, Serving

router = APIRouter(tags=["Tokens"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for templated messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TGITokenizeRequest(_Strict):
    inputs: str
    parameters: dict | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _serving(raw_request: Request) -> Serving:
    return raw_request.app.state.serving


def _validate(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


@router.post("/tokenize")
async def tokenize(raw_request: Request, body: dict = Body(...)):
    serving = _serving(raw_request)
    if "inputs" in body:
        return await _tgi_tokenize(serving, _validate(TGITokenizeRequest, body).inputs)
    request = _validate(TokenizeRequest, body)
    serving.check_model(request.model)
    if (request.prompt is None) == (request.messages is None):
        raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
    if request.messages is not None:
        if request.add_special_tokens:
            raise InvalidRequestError("add_special_tokens applies to a prompt; the chat template places the "
                                      "special tokens of messages", param="add_special_tokens")
        _, token_ids = await serving.chat_prompt([m.as_template_message() for m in request.messages],
                                                 request.add_generation_prompt)
    else:
        token_ids = await serving.encode(request.prompt, add_special_tokens=request.add_special_tokens is not False)
    token_strs = serving.tokenizer.convert_ids_to_tokens(token_ids) if request.return_token_strs else None
    return {"count": len(token_ids), "max_model_len": serving.max_model_len, "tokens": token_ids, "token_strs": token_strs}


async def _tgi_tokenize(serving: Serving, text: str) -> list[dict]:
    """Each token with its character span in `text` (the tokenizer's offsets)."""
    serving.check_text_length(len(text), "inputs")
    encoding = await asyncio.to_thread(serving.tokenizer.encode_with_offsets, text)
    return [{"id": token_id, "text": text[start:stop], "start": start, "stop": stop} for token_id, (start, stop) in encoding]


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request):
    serving = _serving(raw_request)
    serving.check_model(request.model)
    serving.check_token_ids(request.tokens, "tokens")
    return {"prompt": serving.decode(request.tokens)}
