"""The serving layer every protocol shares: model identity, prompts, sampling checks, the engine stream.

Routes translate their wire format into a prompt and `SamplingParams` (with the helpers in protocol/),
call `Serving.generate`, and translate the `RequestOutput`s back. Errors are raised as `ServingError`s;
`as_serving_error` is the one mapping from any exception to a status code, used by app.py's exception
handlers and by streams that fail after their first byte.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from ember.config import ServerConfig
from ember.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestAbortedError, RequestFailedError
from ember.outputs import RequestOutput
from ember.sampling_params import InvalidParameterError, SamplingParams, StructuredOutputsParams
from ember.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
# Longer texts are tokenized in a worker thread (the tokenizer releases the GIL), not on the event loop.
TOKENIZE_ON_LOOP_CHARS = 10_000


# ---- errors --------------------------------------------------------------------------------------
class ServingError(Exception):
    """An error with an HTTP status; each protocol renders it in its own error shape."""

    status_code = 400
    error_type = "invalid_request_error"  # OpenAI's `type`

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(ServingError):
    """A parameter is missing, out of range or unsupported (400)."""


class ModelNotFoundError(ServingError):
    status_code = 404

    def __init__(self, message: str, param: str | None = "model"):
        super().__init__(message, param, code="model_not_found")


class ServerBusyError(ServingError):
    """The waiting queue is full or the server is shutting down (503, with Retry-After)."""

    status_code = 503
    error_type = "server_overloaded"
    retry_after_s = 1


class AuthenticationError(ServingError):
    """No API key, or a wrong one (401)."""

    status_code = 401
    error_type = "authentication_error"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key")


class ForbiddenError(ServingError):
    """A cross-site request from an origin not allowed, or a Host name not allowed (403)."""

    status_code = 403
    error_type = "permission_error"


class PayloadTooLargeError(ServingError):
    status_code = 413


class RequestTimeoutError(ServingError):
    """The client paused too long while sending its body (408)."""

    status_code = 408


class UnsupportedMediaTypeError(ServingError):
    status_code = 415


class GenerationError(ServingError):
    """The engine failed while running the request (500); the server keeps serving."""

    status_code = 500
    error_type = "server_error"


def as_serving_error(exc: BaseException) -> ServingError:
    """The one mapping from an exception to a status code and message."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, InvalidParameterError):
        return InvalidRequestError(str(exc), param=exc.param)
    if isinstance(exc, (QueueFullError, RequestAbortedError)):
        return ServerBusyError(str(exc))
    if isinstance(exc, (EngineDeadError, RequestFailedError)):
        return GenerationError(str(exc))
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return GenerationError(f"internal error: {type(exc).__name__}: {exc}")


def renamed(exc: InvalidParameterError, param_names: dict[str, str] | None) -> InvalidRequestError:
    """`exc` as a 400 that names the parameter as the client's protocol calls it."""
    name = (param_names or {}).get(exc.param, exc.param)
    message = str(exc)
    if name != exc.param:
        message = name + message[len(exc.param):]
    return InvalidRequestError(message, param=name)


def constraint_names(param: str | None) -> dict[str, str]:
    """`param_names` for `Serving.generate`: a constraint that does not compile is named `param`, the
    client's field, rather than the engine's `structured_outputs.<kind>`."""
    kinds = ("json", "json_object", "regex", "choice", "grammar")
    return {f"structured_outputs.{kind}": param for kind in kinds} if param and param != "structured_outputs" else {}


def reject_unsupported(fields: dict[str, object]) -> None:
    """400 for the first field set to a value that would change behaviour Ember does not implement."""
    for name, (value, neutral) in fields.items():
        if value not in neutral:
            raise InvalidRequestError(f"{name} is not supported by this server (got {value!r})", param=name)


# ---- the shared serving state ---------------------------------------------------------------------
class Serving:
    """What every route needs: the engine, the served model's identity, and request helpers."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics | None = None):
        llm = engine.engine
        self.engine = engine
        self.config = config
        self.tokenizer = llm.tokenizer
        self.max_model_len: int = llm.max_model_len
        self.model_path = str(llm.model_path)  # for logs only: answers name the file, never where it lies
        self.model_file_name = os.path.basename(os.path.normpath(self.model_path))
        self.model_name = config.served_model_name or default_model_name(llm.config.model.model, self.model_path)
        self.created = int(time.time())
        self.metrics = metrics
        # +1: a SentencePiece token's leading space may decode as an extra character
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1) + 1

    # ---- identity ------------------------------------------------------------------------------
    def check_model(self, name: str | None, allow_tag: bool = False) -> None:
        """404 unless `name` is the served model (or None); `allow_tag` accepts Ollama's `name:latest`."""
        if name is None or name == self.model_name:
            return
        if allow_tag and name == f"{self.model_name}:latest":
            return
        raise ModelNotFoundError(f"The model `{name}` does not exist. This server serves `{self.model_name}`.")

    # ---- prompts -------------------------------------------------------------------------------
    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of a prompt (special-token spellings are control tokens, as in vLLM and llama.cpp); a text
        too long for the context is a 400 before it is tokenized, and a long one is tokenized off the loop."""
        self.check_text_length(len(text), param)
        if len(text) <= TOKENIZE_ON_LOOP_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    async def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> tuple[str, list[int]]:
        """The model's chat template applied to `messages` (`extra`: template variables such as `tools`), and its
        token ids; the template already holds any BOS token. Special-token spellings inside the messages are
        plain text unless --parse-special-tokens-in-content."""
        if len(messages) > self.config.max_messages:
            raise InvalidRequestError(f"messages has {len(messages)} entries; at most {self.config.max_messages} are "
                                      "allowed (--max-messages)", param="messages")
        num_chars = _num_chars(messages) + _num_chars(extra)
        self.check_text_length(num_chars, "messages")
        render = functools.partial(self.tokenizer.encode_chat, messages, add_generation_prompt,
                                   self.config.parse_special_tokens_in_content, **extra)
        try:
            if num_chars <= TOKENIZE_ON_LOOP_CHARS:
                return render()
            return await asyncio.to_thread(render)
        except Exception as exc:  # a template that raises on this conversation (e.g. role order) is the caller's 400
            raise InvalidRequestError(f"the chat template cannot render these messages: {exc}", param="messages") from exc

    def check_text_length(self, num_chars: int, param: str) -> None:
        """400 for a text with more characters than the context could hold tokens of (no token is longer
        than the vocabulary's longest spelling): no time is spent tokenizing it."""
        limit = self.max_model_len * self.max_token_chars
        if num_chars > limit:
            raise InvalidRequestError(
                f"{param} is {num_chars} characters long: more than this model's context of {self.max_model_len} "
                f"tokens can hold", param=param, code="context_length_exceeded",
            )

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        vocab_size = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param=param)

    def check_context(
        self, num_prompt_tokens: int, max_tokens: int | None, max_tokens_param: str = "max_tokens", prompt_param: str = "prompt"
    ) -> None:
        """400 when the prompt, or the prompt plus an explicitly requested `max_tokens`, exceeds the context."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt is {num_prompt_tokens} "
                "tokens, which leaves no room to generate. Please reduce the length of the prompt.",
                param=prompt_param, code="context_length_exceeded",
            )
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the length of the prompt or {max_tokens_param}.",
                param=max_tokens_param, code="context_length_exceeded",
            )

    # ---- sampling ------------------------------------------------------------------------------
    @staticmethod
    def sampling_params(param_names: dict[str, str] | None = None, **fields) -> SamplingParams:
        """Builds SamplingParams; a validation error names the parameter as the client's protocol calls it."""
        try:
            return SamplingParams(**fields)
        except InvalidParameterError as exc:
            raise renamed(exc, param_names) from exc

    @staticmethod
    def structured_outputs(param: str, **fields) -> StructuredOutputsParams:
        """A constraint from the client's field `param`; its validation errors name `param`."""
        try:
            return StructuredOutputsParams(**fields)
        except InvalidParameterError as exc:
            # vLLM's structured_outputs has the engine's own names (structured_outputs.choice, ...)
            raise renamed(exc, {} if param == "structured_outputs" else {exc.param: param}) from exc

    def check_bounds(self, params: SamplingParams) -> None:
        """The server's limits on one request (InvalidParameterError naming the field)."""
        config = self.config
        if params.n > config.max_n:
            raise InvalidParameterError("n", f"must be at most {config.max_n} (--max-n), got {params.n}")
        if len(params.stop) > config.max_stop_strings:
            raise InvalidParameterError("stop", f"has {len(params.stop)} strings; at most {config.max_stop_strings} "
                                        "are allowed (--max-stop-strings)")
        longest = max((len(stop) for stop in params.stop), default=0)
        if longest > config.max_stop_string_length:
            raise InvalidParameterError("stop", f"has a string of {longest} characters; at most "
                                        f"{config.max_stop_string_length} are allowed (--max-stop-string-length)")
        if params.structured_outputs is not None:
            kind, text = params.structured_outputs.key
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > config.max_grammar_bytes:
                raise InvalidParameterError(f"structured_outputs.{kind}", f"is {size} bytes; at most "
                                            f"{config.max_grammar_bytes} are allowed (--max-grammar-bytes)")

    # ---- generation ----------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None, priority: int = 0,
        param_names: dict[str, str] | None = None,
    ) -> "RequestStream":
        """Queues a request and returns its outputs; raises a ServingError before any output for bad input
        (a constraint that does not compile included; `param_names` renames its parameter for the client).

        Closing the returned stream, cancelling its reader, or dropping it unread aborts the request.
        """
        request_id = f"req-{uuid.uuid4().hex}"
        try:
            self.check_bounds(params)
            stream = await self.engine.generate(
                prompt=prompt, params=params, request_id=request_id, prompt_token_ids=prompt_token_ids, priority=priority
            )
        except InvalidParameterError as exc:
            raise renamed(exc, param_names) from exc
        except Exception as exc:
            raise as_serving_error(exc) from exc
        return RequestStream(self, request_id, stream)

    async def generate_final(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None, priority: int = 0) -> RequestOutput:
        """Runs a request to the end and returns its last output (cumulative text and tokens)."""
        final = None
        stream = await self.generate(prompt_token_ids, params, prompt, priority)
        try:
            async for final in stream:
                pass
        finally:
            await stream.aclose()
        return final


class RequestStream:
    """One request's outputs, recorded in the metrics as they pass. Unless it ran to its end, closing it,
    cancelling its reader, or dropping it unread (a client gone before its stream started) aborts it."""

    def __init__(self, serving: Serving, request_id: str, stream: AsyncIterator[RequestOutput]):
        self.request_id = request_id
        self._engine = serving.engine
        self._stream = stream
        self._tracker = serving.metrics.track() if serving.metrics is not None else None
        self._loop = asyncio.get_running_loop()
        self._is_done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            output = await self._stream.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        except (EngineDeadError, RequestFailedError, RequestAbortedError) as exc:
            self._end()
            raise as_serving_error(exc) from exc
        except BaseException:  # cancelled: the engine stream aborted the request on its way out
            self._end()
            raise
        if self._tracker is not None:
            self._tracker.on_output(output)
        if output.finished:
            self._end()
        return output

    async def aclose(self) -> None:
        if not self._is_done:
            self._engine.abort(self.request_id)
            self._end()
        await self._stream.aclose()

    def _end(self) -> None:
        if not self._is_done:
            self._is_done = True
            if self._tracker is not None:
                self._tracker.on_end()

    def __del__(self) -> None:
        if not self._is_done and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._engine.abort, self.request_id)


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleaves several async iterators as items arrive, yielding (stream index, item)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as exc:  # hand failures to the consumer, which re-raises them
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            index, item = await queue.get()
            if item is done:
                num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # throws into each stream, which aborts its request
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


# ---- HTTP helpers ---------------------------------------------------------------------------------
def cancel_on_disconnect(handler: Callable) -> Callable:
    """Runs a handler until it returns or its client disconnects; on disconnect the handler is cancelled,
    which closes its engine stream and so aborts the request (for non-streamed responses)."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        request: Request = kwargs["raw_request"]
        handler_task = asyncio.ensure_future(handler(*args, **kwargs))
        disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait([handler_task, disconnect_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect_task.cancel()
        if handler_task in done:
            return handler_task.result()
        handler_task.cancel()
        try:
            await handler_task
        except BaseException:
            pass
        return None  # nobody is listening any more

    return wrapper


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def event_stream(
    events: AsyncIterator[dict],
    encode: Callable[[dict], str],
    error_event: Callable[[ServingError], dict],
    media_type: str = "text/event-stream",
    trailer: str = "",
) -> StreamingResponse:
    """A streamed response; a failure after the first byte ends it with the protocol's error event."""

    async def body():
        try:
            async for event in events:
                yield encode(event)
        except Exception as exc:
            yield encode(error_event(as_serving_error(exc)))
        if trailer:
            yield trailer

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type=media_type, headers=headers)


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _num_chars(value) -> int:
    """Characters in the strings of a JSON-like value (messages, tools)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_num_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_num_chars(v) for v in value)
    return 0


def default_model_name(model_arg: str | None, model_path: str) -> str:
    """A hub id keeps its name; a file or folder is named by its base name (without `.gguf`)."""
    if model_arg and not os.path.exists(model_arg):
        return model_arg
    name = os.path.basename(os.path.normpath(model_path))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name
