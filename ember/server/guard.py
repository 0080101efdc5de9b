"""`RequestGuard`: the checks every HTTP request passes before a route sees it, in order: the Host name
(DNS rebinding), the Origin of a browser's request (cross-site), the API key, then the body: its size, the
client's pauses while sending it, its content type, and JSON that Python would accept but no client means
(Infinity, NaN, numbers past float range, lone surrogates). Each failure is answered in the protocol's error
shape by `render(path, err)`."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import re
from collections.abc import Callable

from ember.config import ServerConfig
from ember.server.serving import (
    AuthenticationError,
    ForbiddenError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServingError,
    UnsupportedMediaTypeError,
)

# Paths open without a key: the health probe, and the chat page itself (which then asks for the key).
PUBLIC_PATHS = ("/health",)
PAGE_PATHS = ("/", "/favicon.ico")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# A JSON text can only hold a lone surrogate as a \uD800-\uDFFF escape; only bodies with one are walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_NON_FINITE = re.compile(rb"Infinity|NaN|[eE]\+?\d{3}")  # a literal, or an exponent that may overflow
_PARSE_OFF_LOOP_BYTES = 1 << 20


class RequestGuard:
    def __init__(self, app, config: ServerConfig, render: Callable[[str, ServingError], tuple[int, dict, dict]]):
        self.app = app
        self.config = config
        self.render = render
        self._key_digests = [_digest(key) for key in config.api_keys()]
        self._allowed_hosts = {h.lower() for h in config.allowed_hosts} | {config.host.lower()}
        self._allowed_origins = set(config.allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        try:
            self._check_host(headers.get("host", ""))
            self._check_origin(scope, headers)
            self._check_key(scope, headers)
            if scope["method"] not in SAFE_METHODS:
                body = await self._read_body(headers, receive)
                if body is None:
                    return  # the client left: nobody to answer
                scope = self._json_scope(scope, headers)
                await _check_json(body)
                receive = _replay(body, receive)
        except ServingError as err:
            return await self._reject(scope, send, err)
        await self.app(scope, receive, send)

    # ---- who may ask --------------------------------------------------------------------------
    def _check_host(self, host_header: str) -> None:
        """Only Host names that cannot be rebound: IP addresses, localhost names, --host and --allowed-hosts.
        A page on another domain that rebinds its name to this machine sends its own name here."""
        if "*" in self._allowed_hosts or not host_header:
            return
        host = _host_name(host_header)
        if host in self._allowed_hosts or host == "localhost" or host.endswith(".localhost") or _is_ip(host):
            return
        if any(h.startswith("*.") and host.endswith(h[1:]) for h in self._allowed_hosts):
            return
        raise ForbiddenError(f"the Host {host!r} is not allowed; start the server with --allowed-hosts {host} to serve it")

    def _check_origin(self, scope, headers: dict[str, str]) -> None:
        """A browser's request from another site (its Origin is neither this server nor --allowed-origins)
        may not change anything: browsers send a cross-site form or text/plain POST without asking first."""
        origin = headers.get("origin")
        if origin is None or scope["method"] in SAFE_METHODS or self._origin_allowed(origin, scope, headers):
            return
        raise ForbiddenError(f"cross-site requests from {origin} are not allowed; start the server with "
                             f"--allowed-origins {origin} to allow them")

    def _origin_allowed(self, origin: str, scope, headers: dict[str, str]) -> bool:
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        return origin == own or origin in self._allowed_origins or "*" in self._allowed_origins

    def _check_key(self, scope, headers: dict[str, str]) -> None:
        if not self._key_digests or _is_public(scope["method"], scope["path"], self.config):
            return
        given = headers.get("x-api-key")
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip()
        if given is None:
            raise AuthenticationError("this server needs an API key: send it as `Authorization: Bearer KEY`")
        digest = _digest(given)
        # Every key compared, each in constant time: neither the match nor its position shows in the timing.
        matched = [hmac.compare_digest(digest, key) for key in self._key_digests]
        if not any(matched):
            raise AuthenticationError("the API key is not valid")

    # ---- the body -----------------------------------------------------------------------------
    async def _read_body(self, headers: dict[str, str], receive) -> bytes | None:
        limit = self.config.max_request_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"the request body is {int(declared)} bytes; this server takes at most {limit}")
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.config.body_timeout)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"the client sent no part of its body for {self.config.body_timeout:g} s") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"the request body is over {limit} bytes, the most this server takes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _json_scope(self, scope, headers: dict[str, str]):
        """Every body here is JSON. A browser must say so (a cross-site page cannot, without a preflight);
        other clients (curl -d, which sends a form type) may send any type."""
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = content_type == "application/json" or content_type.endswith("+json")
        if not is_json and "origin" in headers:
            raise UnsupportedMediaTypeError(f"the body must be sent as application/json, not {content_type or 'untyped'}")
        if is_json:
            return scope
        kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        return dict(scope, headers=kept + [(b"content-type", b"application/json")])

    async def _reject(self, scope, send, err: ServingError) -> None:
        status, headers, body = self.render(scope["path"], err)
        payload = json.dumps(body).encode()
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if status == 401:
            raw_headers.append((b"www-authenticate", b"Bearer"))
        if status in (408, 413):  # the body was not read to its end: this connection cannot carry another request
            raw_headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})


async def _check_json(body: bytes) -> None:
    """400 naming the field for a value no JSON client means: a non-finite number or a lone surrogate.
    Malformed JSON passes: the route's parser reports where it breaks."""
    if not (_SURROGATE_ESCAPE.search(body) or _NON_FINITE.search(body)):
        return
    if len(body) > _PARSE_OFF_LOOP_BYTES:
        problem = await asyncio.to_thread(_find_bad_value, body)
    else:
        problem = _find_bad_value(body)
    if problem is not None:
        path, message = problem
        raise InvalidRequestError(f"{path or 'request body'}: {message}", param=path or None)


def _find_bad_value(body: bytes) -> tuple[str, str] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    stack = [("", value)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, f"{value} is not a finite number"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path, "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and _has_surrogate(key):
                    return f"{path}.{key!r}".lstrip("."), "a key holds a lone UTF-16 surrogate"
                stack.append((f"{path}.{key}".lstrip("."), item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}".lstrip("."), item) for i, item in enumerate(value))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _replay(body: bytes, receive):
    """`receive` for the app: the body read here once, then the client's own (a disconnect, later)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _is_public(method: str, path: str, config: ServerConfig) -> bool:
    if path in PUBLIC_PATHS or (config.metrics_public and path == "/metrics"):
        return True
    # The page is public to read, not to post to: POST / is TGI's generate route.
    return method in ("GET", "HEAD") and (path in PAGE_PATHS or path.startswith("/static/"))


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
