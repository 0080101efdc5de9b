"""build_app(engine, config): the FastAPI app with every protocol's routes, the one place where errors
become responses (in the calling protocol's error shape), and a lifespan that starts and drains the engine."""
from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager

import uvicorn

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import __version__
from ember.config import ServerConfig
from ember.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from ember.sampling_params import InvalidParameterError
from ember.server.metrics import ServerMetrics
from ember.server.protocol import ollama as ollama_protocol
from ember.server.protocol import openai as openai_protocol
from ember.server.protocol import tgi as tgi_protocol
from ember.server.editor import EditorService
from ember.server.protocol import llamacpp as llamacpp_protocol
from ember.server.routes import completion, health, llamacpp, metrics, ollama, openai, tgi, tokens, web
from ember.server.serving import InvalidRequestError, Serving, ServingError, as_serving_error

logger = logging.getLogger(__name__)

TGI_PATHS = ("/", "/generate", "/generate_stream", "/info")
LLAMACPP_PATHS = ("/infill", "/completion", "/completions")


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    serving = Serving(engine, config)
    serving.metrics = ServerMetrics(engine, serving.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(config.drain_timeout)

    app = FastAPI(
        title="Ember",
        version=__version__,
        description="A self-hosted LLM server: OpenAI, TGI, Ollama and editor (llama.cpp infill, Copilot, Tabby) protocols over one engine.",
        lifespan=lifespan,
    )
    app.add_middleware(_JSONBodies)
    app.state.serving = serving
    app.state.metrics = serving.metrics
    app.state.editor = EditorService(serving)
    for module in (openai, completion, llamacpp, tgi, ollama, tokens, health, metrics, web):
        app.include_router(module.router)

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for exc_type in (ServingError, InvalidParameterError, QueueFullError, EngineDeadError, Exception):
        app.add_exception_handler(exc_type, _serving_error)
    return app


class _JSONBodies:
    """Reads every POST body as JSON, whatever its content type: Ollama's and llama.cpp's documented curl
    examples post JSON with `-d` (sent as a form), and no route here takes a form."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


# ---- errors: the one place they become responses -------------------------------------------------
def error_response(request: Request, err: ServingError) -> JSONResponse:
    """`err` in the error shape of the protocol the request's path belongs to."""
    path = request.url.path
    headers = {"Retry-After": str(getattr(err, "retry_after_s", 1))} if err.status_code == 503 else None
    if path.startswith("/api/"):
        return JSONResponse(ollama_protocol.error_body(err), err.status_code, headers)
    if path in LLAMACPP_PATHS:
        return JSONResponse(llamacpp_protocol.error_body(err), err.status_code, headers)
    if path in TGI_PATHS:
        return JSONResponse(tgi_protocol.error_body(err), tgi_protocol.status_code(err), headers)
    return JSONResponse(openai_protocol.error_body(err), err.status_code, headers)


async def _serving_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, as_serving_error(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's errors as a 400 naming the first offending field (malformed JSON included)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        message, param = f"malformed JSON in the request body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    elif kind == "extra_forbidden":
        message = f"unsupported field: {param}"
    elif kind == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else f"request body: {first.get('msg', 'invalid')}"
    return error_response(request, InvalidRequestError(message, param=param))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = ServingError(str(exc.detail))
    err.status_code = exc.status_code
    err.error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    response = error_response(request, err)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


# ---- serve -----------------------------------------------------------------------------------------
def run_server(async_engine: AsyncEngine, config: ServerConfig) -> None:
    """Serves until SIGTERM/SIGINT, then stops accepting, drains (up to `drain_timeout`), and returns."""
    app = build_app(async_engine, config)
    uvicorn_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", workers=1,
        timeout_graceful_shutdown=config.drain_timeout + 5,  # a backstop: the engine's drain ends streams first
    )
    server = _DrainingServer(uvicorn_config, async_engine, config.drain_timeout)
    serving = app.state.serving
    logger.info(
        "serving %s (%s): context %d tokens, KV cache %d tokens, at http://%s:%d (API docs at /docs)",
        serving.model_name, serving.model_path, serving.max_model_len, async_engine.engine.runner.num_kv_tokens, config.host, config.port,
    )
    # uvicorn re-raises the signal it caught once it has shut down; with a Python handler already in place
    # that re-raise is harmless, so a drained server exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()


class _DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, also tells the engine to stop accepting and drain: requests still
    running after `drain_timeout` are aborted, and their streams end with an error event."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit and getattr(self, "_loop", None) is not None:
            self._loop.call_soon_threadsafe(self._start_drain)
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        logger.info("shutting down: no new requests; draining %d in flight (up to %.0f s)", self.engine.num_in_flight, self.drain_timeout)
        self._drain_task = asyncio.ensure_future(self.engine.shutdown(self.drain_timeout))
