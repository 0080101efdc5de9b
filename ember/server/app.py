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
from fastapi.middleware.cors import CORSMiddleware
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
from ember.server.connections import timed_h11_protocol
from ember.server.editor import EditorService
from ember.server.guard import RequestGuard
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
    # Added last, so outermost: a browser's preflight is answered before the guard asks it for a key.
    app.add_middleware(RequestGuard, config=config, render=_render_error)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], max_age=600)
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


# ---- errors: the one place they become responses -------------------------------------------------
def error_response(request: Request, err: ServingError) -> JSONResponse:
    """`err` in the error shape of the protocol the request's path belongs to."""
    status, headers, body = _render_error(request.url.path, err)
    return JSONResponse(body, status, headers or None)


def _render_error(path: str, err: ServingError) -> tuple[int, dict, dict]:
    """(status, headers, body) of `err` for a request to `path`."""
    headers = {"Retry-After": str(getattr(err, "retry_after_s", 1))} if err.status_code == 503 else {}
    if path.startswith("/api/"):
        return err.status_code, headers, ollama_protocol.error_body(err)
    if path in LLAMACPP_PATHS:
        return err.status_code, headers, llamacpp_protocol.error_body(err)
    if path in TGI_PATHS:
        return tgi_protocol.status_code(err), headers, tgi_protocol.error_body(err)
    return err.status_code, headers, openai_protocol.error_body(err)


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
        http=timed_h11_protocol(config.header_timeout),
        timeout_keep_alive=config.keep_alive_timeout,
        limit_concurrency=config.max_connections,
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,
        timeout_graceful_shutdown=config.drain_timeout + 5,  # a backstop: the engine's drain ends streams first
    )
    server = _DrainingServer(uvicorn_config, async_engine, config.drain_timeout)
    serving = app.state.serving
    scheme = "https" if config.ssl_certfile else "http"
    logger.info(
        "serving %s (%s): context %d tokens, KV cache %d tokens, at %s://%s:%d (API docs at /docs)%s",
        serving.model_name, serving.model_path, serving.max_model_len, async_engine.engine.runner.num_kv_tokens,
        scheme, config.host, config.port, "; API keys required" if config.api_key or config.api_key_file else "",
    )
    # uvicorn re-raises the signal it caught once it has shut down; with a Python handler already in place
    # that re-raise is harmless, so a drained server exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()


class _DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT the engine stops accepting and drains while the server keeps its port:
    new requests and /health get 503 rather than a refused connection. Requests still running after
    `drain_timeout` are aborted (their streams end with an error event); then the server exits. A second
    signal exits at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is None and getattr(self, "_loop", None) is not None:
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain_task is not None:
            return
        logger.info("shutting down: no new requests; draining %d in flight (up to %.0f s)", self.engine.num_in_flight, self.drain_timeout)
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.engine.shutdown(self.drain_timeout)
        await asyncio.sleep(0.2)  # the aborted streams' last events reach their clients
        self.should_exit = True
