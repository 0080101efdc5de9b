"""Access control and request bounds on real servers: API keys through each protocol's own client, the
cross-site and DNS-rebinding checks, CORS for --allowed-origins, HTTPS, body size and pause limits, the header
and keep-alive deadlines, and /health while draining. Three servers: the package `server` (no key), a keyed
one with tight bounds, and a TLS one."""
from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import socket
import ssl
import threading
import time

import httpx
import ollama
import openai
import pytest

from tests.server.conftest import MODEL_NAME, EmberServer

KEYS = ("key-one", "key-two", "key-three")  # the last comes from --api-key-file
BODY_LIMIT = 100_000
KEEP_ALIVE_TIMEOUT = 4.0
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
GOOD_ORIGIN = "http://good.example"
EVIL_ORIGIN = "http://evil.example"
COMPLETION = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
DEFAULT_BODY_LIMIT = 8 * 2**20


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyed")
    key_file = folder / "keys.txt"
    key_file.write_text("# one key a line\nkey-three\n")
    ember = EmberServer(
        "--api-key", KEYS[0], "--api-key", KEYS[1], "--api-key-file", str(key_file),
        "--allowed-origins", GOOD_ORIGIN, "--max-request-body-bytes", str(BODY_LIMIT),
        "--body-timeout", str(BODY_TIMEOUT), "--header-timeout", str(HEADER_TIMEOUT),
        "--keep-alive-timeout", str(KEEP_ALIVE_TIMEOUT),
        log_path=str(folder / "ember.log"),
    )
    yield ember
    ember.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- API keys, through each protocol's client ------------------------------------------------------
def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text[:300])
    assert response.headers["www-authenticate"] == "Bearer"


def test_openai_sdk_needs_a_key(keyed):
    for key in ("wrong-key", KEYS[0] + "x"):  # the SDK sends no request without some key: "none" is below, by httpx
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as err:
            client.models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key" and err.value.type == "authentication_error"
        assert err.value.response.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    for key in KEYS:
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL_NAME]
        chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
        assert chat.usage.completion_tokens == 2


def test_openai_error_shape(keyed):
    response = httpx.get(keyed.url + "/v1/models")
    assert_401(response)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key" and error["param"] is None
    assert "API key" in error["message"]
    chat = httpx.post(keyed.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]})
    assert_401(chat)
    assert chat.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(keyed.url + "/v1/models", headers=bearer("key-four"))
    assert_401(wrong)
    assert wrong.json()["error"]["code"] == "invalid_api_key"


def test_ollama_client_needs_a_key(keyed):
    for headers in ({}, bearer("wrong-key"), {"x-api-key": "wrong-key"}):
        client = ollama.Client(host=keyed.url, headers=headers, timeout=60)
        with pytest.raises(ollama.ResponseError) as err:
            client.list()
        assert err.value.status_code == 401 and "API key" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}, stream=False)
        assert err.value.status_code == 401
    for headers in [bearer(key) for key in KEYS] + [{"x-api-key": KEYS[2]}]:
        client = ollama.Client(host=keyed.url, headers=headers, timeout=60)
        assert [m.model for m in client.list().models] == [MODEL_NAME]
        chat = client.chat(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2, "temperature": 0}, stream=False)
        assert chat.done and chat.eval_count == 2
    body = httpx.get(keyed.url + "/api/tags").json()
    assert list(body) == ["error"] and isinstance(body["error"], str)


def test_tgi_client_needs_a_key(keyed):
    text_generation = pytest.importorskip("text_generation")
    from text_generation.errors import UnknownError

    for headers in ({}, bearer("wrong-key")):
        client = text_generation.Client(keyed.url, headers=headers, timeout=60)  # posts to POST / (TGI's compat route)
        with pytest.raises(UnknownError, match="API key"):
            client.generate("Hello", max_new_tokens=2)
    for headers in [bearer(key) for key in KEYS] + [{"x-api-key": KEYS[0]}]:
        client = text_generation.Client(keyed.url, headers=headers, timeout=60)
        assert client.generate("Hello", max_new_tokens=2).details.generated_tokens == 2


def test_tgi_error_shape(keyed):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    for path in ("/generate", "/generate_stream", "/"):
        response = httpx.post(keyed.url + path, json=body)
        assert_401(response)
        assert response.json() == {"error": response.json()["error"], "error_type": "authentication"}
        assert httpx.post(keyed.url + path, json=body, headers=bearer(KEYS[1]), timeout=60).status_code == 200


# Editors' bodies: llama.vim (/infill), Copilot (/v1/engines/codegen/completions), Continue's Mistral FIM,
# llama.cpp's /completion; and the plain GET routes.
EDITOR_REQUESTS = {
    "infill": ("POST", "/infill", {"input_prefix": "def f():\n", "prompt": "    ", "input_suffix": "\n", "input_extra": [],
                                    "n_predict": 2, "top_k": 1, "stream": False, "cache_prompt": True}),
    "copilot": ("POST", "/v1/engines/codegen/completions", {"prompt": "def f():\n    ", "suffix": "\n", "max_tokens": 2,
                                                             "temperature": 0, "n": 1, "stream": False, "extra": {"language": "python"}}),
    "mistral_fim": ("POST", "/v1/fim/completions", {"model": "codestral-latest", "prompt": "def f():\n    ", "suffix": "\n",
                                                     "max_tokens": 2, "temperature": 0, "stream": False}),
    "llamacpp_completion": ("POST", "/completion", {"prompt": "Hello", "n_predict": 2, "temperature": 0}),
    "tokenize": ("POST", "/tokenize", {"prompt": "Hello"}),
    "metrics": ("GET", "/metrics", None),
    "docs": ("GET", "/docs", None),
    "openapi": ("GET", "/openapi.json", None),
}


@pytest.mark.parametrize("name", list(EDITOR_REQUESTS))
def test_editor_and_plain_routes_need_a_key(keyed, name):
    method, path, body = EDITOR_REQUESTS[name]

    def send(headers: dict) -> httpx.Response:
        return httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=60)

    for headers in ({}, bearer("wrong-key"), {"x-api-key": "wrong-key"}, {"Authorization": "Basic a2V5LW9uZTo="}):
        response = send(headers)
        assert_401(response)
        error = response.json()["error"]
        if path in ("/infill", "/completion"):  # llama.cpp's shape
            assert error["code"] == 401 and error["type"] == "authentication_error" and "API key" in error["message"]
        else:
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    for headers in [bearer(key) for key in KEYS] + [{"x-api-key": key} for key in KEYS] + [{"Authorization": f"bearer {KEYS[0]}"}]:
        response = send(headers)
        assert response.status_code == 200, (headers, response.status_code, response.text[:300])


def test_every_documented_route_needs_a_key(keyed):
    """Each path and method in the OpenAPI schema, sent without a key, is refused; only /health is open."""
    schema = httpx.get(keyed.url + "/openapi.json", headers=bearer(KEYS[0])).json()
    opened = []
    for path, operations in schema["paths"].items():
        if "{" in path:
            path = path.replace("{engine}", "codegen")
        for method in operations:
            response = httpx.request(method.upper(), keyed.url + path, json={} if method != "get" else None, timeout=60)
            if response.status_code != 401:
                opened.append(f"{method.upper()} {path} -> {response.status_code}")
    assert opened == ["GET /health -> 200"]


def test_page_and_health_answer_without_a_key(keyed):
    for path in ("/health", "/", "/static/app.js", "/static/style.css"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    assert httpx.get(keyed.url + "/health", headers=bearer("wrong-key")).status_code == 200


def test_cors_for_allowed_origins(keyed):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"}
    good = httpx.options(keyed.url + "/v1/chat/completions", headers={"Origin": GOOD_ORIGIN, **preflight})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert "authorization" in good.headers["access-control-allow-headers"].lower()
    evil = httpx.options(keyed.url + "/v1/chat/completions", headers={"Origin": EVIL_ORIGIN, **preflight})
    assert "access-control-allow-origin" not in evil.headers
    # the page on the allowed origin: served with its key, and it can read the 401 that asks for one
    served = httpx.post(keyed.url + "/v1/completions", json=COMPLETION, headers={"Origin": GOOD_ORIGIN, **bearer(KEYS[0])}, timeout=60)
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == GOOD_ORIGIN
    refused = httpx.post(keyed.url + "/v1/completions", json=COMPLETION, headers={"Origin": GOOD_ORIGIN})
    assert_401(refused)
    assert refused.headers["access-control-allow-origin"] == GOOD_ORIGIN
    # another site's page, key or not
    other = httpx.post(keyed.url + "/v1/completions", json=COMPLETION, headers={"Origin": EVIL_ORIGIN, **bearer(KEYS[0])})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


# ---- cross-site requests and DNS rebinding, on the package server (no key) ------------------------------
def generated_tokens(server: EmberServer) -> float:
    return server.metric("ember:generation_tokens_total")


def test_no_cors_without_allowed_origins(server):
    response = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert not any(name.startswith("access-control-") for name in response.headers), dict(response.headers)
    assert response.status_code < 500


def test_cross_site_posts_are_refused(server):
    before = generated_tokens(server)
    body = json.dumps(COMPLETION)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json"):
        response = httpx.post(server.url + "/v1/completions", content=body, headers={"Origin": EVIL_ORIGIN, "Content-Type": content_type})
        assert response.status_code == 403, (content_type, response.status_code, response.text[:200])
        error = response.json()["error"]
        assert error["type"] == "permission_error" and EVIL_ORIGIN in error["message"]
        assert "access-control-allow-origin" not in response.headers
    ollama_body = json.dumps({"model": MODEL_NAME, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    refused = httpx.post(server.url + "/api/generate", content=ollama_body, headers={"Origin": "null", "Content-Type": "text/plain"})
    assert refused.status_code == 403 and isinstance(refused.json()["error"], str)
    assert generated_tokens(server) == before  # nothing was generated


def test_same_origin_and_originless_posts_are_served(server):
    own = httpx.post(server.url + "/v1/completions", json=COMPLETION, headers={"Origin": server.url}, timeout=60)
    assert own.status_code == 200 and own.json()["usage"]["completion_tokens"] == 2
    # `curl -d` sends a form type and no Origin: Ollama's and llama.cpp's documented usage
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    ollama_body = json.dumps({"model": MODEL_NAME, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    answer = httpx.post(server.url + "/api/generate", content=ollama_body, headers=form, timeout=60)
    assert answer.status_code == 200 and answer.json()["eval_count"] == 2
    plain = httpx.post(server.url + "/v1/completions", content=json.dumps(COMPLETION), headers={"Content-Type": "text/plain"}, timeout=60)
    assert plain.status_code == 200


def test_foreign_host_is_refused(server):
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        got = httpx.get(server.url + "/v1/models", headers={"Host": host})
        assert got.status_code == 403, host
        assert got.json()["error"]["type"] == "permission_error"
        posted = httpx.post(server.url + "/v1/completions", json=COMPLETION, headers={"Host": host})
        assert posted.status_code == 403, host
    ollama_host = httpx.get(server.url + "/api/tags", headers={"Host": "evil.example"})
    assert ollama_host.status_code == 403 and isinstance(ollama_host.json()["error"], str)


def test_local_hosts_are_accepted(server):
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "localhost", "LOCALHOST"):
        response = httpx.get(server.url + "/v1/models", headers={"Host": host})
        assert response.status_code == 200, (host, response.text[:200])
    posted = httpx.post(server.url + "/v1/completions", json=COMPLETION, headers={"Host": f"localhost:{server.port}"}, timeout=60)
    assert posted.status_code == 200


# ---- bounds on one request -----------------------------------------------------------------------
def padded_body(size: int) -> bytes:
    """A valid completion body of exactly `size` bytes (JSON allows trailing white space)."""
    body = json.dumps(COMPLETION).encode()
    return body + b" " * (size - len(body))


def chunks(body: bytes, size: int = 64 * 1024):
    for start in range(0, len(body), size):
        yield body[start:start + size]


def test_body_limit_on_the_keyed_server(keyed):
    headers = {**bearer(KEYS[0]), "Content-Type": "application/json"}
    at_limit = httpx.post(keyed.url + "/v1/completions", content=padded_body(BODY_LIMIT), headers=headers, timeout=60)
    assert at_limit.status_code == 200, at_limit.text[:200]
    chunked_at_limit = httpx.post(keyed.url + "/v1/completions", content=chunks(padded_body(BODY_LIMIT)), headers=headers, timeout=60)
    assert chunked_at_limit.status_code == 200, chunked_at_limit.text[:200]
    over = padded_body(BODY_LIMIT + 1)
    for content in (over, chunks(over)):
        response = httpx.post(keyed.url + "/v1/completions", content=content, headers=headers, timeout=60)
        assert response.status_code == 413, response.text[:200]
        assert str(BODY_LIMIT) in response.json()["error"]["message"]
    ollama_over = httpx.post(keyed.url + "/api/generate", content=over, headers=headers, timeout=60)
    assert ollama_over.status_code == 413 and str(BODY_LIMIT) in ollama_over.json()["error"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def test_default_body_limit_and_memory(server):
    big = padded_body(9_000_000)
    before = rss_bytes(server.process.pid)
    for _ in range(5):
        for content in (big, chunks(big)):
            response = httpx.post(server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"}, timeout=60)
            assert response.status_code == 413, response.text[:200]
            assert str(DEFAULT_BODY_LIMIT) in response.json()["error"]["message"]
    after = rss_bytes(server.process.pid)
    assert after - before < 50 * 2**20, (before, after)
    assert httpx.get(server.url + "/health").status_code == 200


def connect(ember: EmberServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", ember.port), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """What the server sent, and how long after the call it closed the connection (None: still open)."""
    start = time.monotonic()
    data = b""
    sock.settimeout(0.2)
    while time.monotonic() - start < timeout:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    return data, None


def request_head(ember: EmberServer, method: str, path: str, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{ember.port}\r\nAuthorization: Bearer {KEYS[0]}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_pause_mid_body_gets_408(keyed, framing):
    with connect(keyed) as sock:
        if framing == "content-length":
            sock.sendall(request_head(keyed, "POST", "/v1/completions", "Content-Length: 100\r\n") + b'{"prompt":')
        else:
            sock.sendall(request_head(keyed, "POST", "/v1/completions", "Transfer-Encoding: chunked\r\n") + b'a\r\n{"prompt":\r\n')
        data, closed_after = read_until_closed(sock, timeout=BODY_TIMEOUT + KEEP_ALIVE_TIMEOUT + 2)
    assert data.startswith(b"HTTP/1.1 408 "), data[:300]
    assert b"no part of its body for 2 s" in data
    # the connection cannot carry another request; today it is closed by the keep-alive timer, not at once
    assert closed_after is not None and closed_after >= BODY_TIMEOUT - 0.5, closed_after


def test_slow_headers_are_cut_off(keyed):
    with connect(keyed) as half_line:
        half_line.sendall(b"GET /v1/mod")
        data, closed_after = read_until_closed(half_line, timeout=HEADER_TIMEOUT + 4)
    assert closed_after is not None, "the server kept a half-sent request line open"
    assert closed_after >= HEADER_TIMEOUT - 0.5 and data == b"", (closed_after, data[:200])
    # slow loris: a header byte every 0.3 s keeps the connection busy but never finishes the headers
    with connect(keyed) as loris:
        head = request_head(keyed, "GET", "/v1/models", "X-Padding: " + "a" * 200 + "\r\n")
        start = time.monotonic()
        closed = False
        for byte in head[:-4]:
            try:
                loris.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if time.monotonic() - start > HEADER_TIMEOUT + 4:
                break
            loris.settimeout(0.3)
            try:
                if loris.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = True
                break
        elapsed = time.monotonic() - start
    assert closed and elapsed < HEADER_TIMEOUT + 3, elapsed


def test_idle_keep_alive_connection_is_closed(keyed):
    """After --keep-alive-timeout (4 s), even though --header-timeout (2 s) is shorter: an idle connection is
    not a client that is slow to send its headers."""
    with connect(keyed) as sock:
        sock.sendall(request_head(keyed, "GET", "/health"))
        sock.settimeout(10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first[:200]
        _, closed_after = read_until_closed(sock, timeout=KEEP_ALIVE_TIMEOUT + 4)
    assert closed_after is not None, "an idle keep-alive connection stayed open"
    assert KEEP_ALIVE_TIMEOUT - 0.5 <= closed_after <= KEEP_ALIVE_TIMEOUT + 2, (
        f"closed after {closed_after:.1f} s; --keep-alive-timeout {KEEP_ALIVE_TIMEOUT:g}, --header-timeout {HEADER_TIMEOUT:g}")
    # a connection in use is not cut: a second request after a short pause is served on it
    with connect(keyed) as sock:
        sock.settimeout(10)
        for _ in range(2):
            sock.sendall(request_head(keyed, "GET", "/health"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(1)


def test_log_never_holds_the_keys(keyed):
    """After the tests above sent every key, right and wrong, in both headers."""
    httpx.get(keyed.url + "/v1/models", headers=bearer("wrong-key"))
    keyed._log.flush()
    with open(keyed.log_path) as f:
        log = f.read()
    assert "API keys required" in log
    for key in (*KEYS, "wrong-key"):
        assert key not in log


# ---- TLS ---------------------------------------------------------------------------------------------
def make_self_signed(folder) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class TLSEmberServer(EmberServer):
    """An EmberServer that serves HTTPS: it polls https://.../health, trusting only `cert_path`."""

    scheme = "https"

    def __init__(self, *args: str, cert_path: str, key_path: str, log_path: str):
        self.context = self.verify = ssl.create_default_context(cafile=cert_path)
        super().__init__("--ssl-certfile", cert_path, "--ssl-keyfile", key_path, *args, log_path=log_path)


TLS_KEY = "tls-key"
DRAIN_TIMEOUT = 5


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = make_self_signed(folder)
    ember = TLSEmberServer("--api-key", TLS_KEY, "--metrics-public", "--drain-timeout", str(DRAIN_TIMEOUT),
                           cert_path=cert_path, key_path=key_path, log_path=str(folder / "ember.log"))
    yield ember
    ember.stop()


def test_https_round_trip(tls):
    assert tls.url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=tls.context, timeout=60) as client:
        assert client.get(tls.url + "/health").status_code == 200
        response = client.post(tls.url + "/v1/completions", json={**COMPLETION, "max_tokens": 4}, headers=bearer(TLS_KEY))
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
        sdk = openai.OpenAI(base_url=tls.url + "/v1", api_key=TLS_KEY, http_client=client, max_retries=0)
        assert sdk.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4).usage.completion_tokens == 4
    with open(tls.log_path) as f:
        assert f"at https://127.0.0.1:{tls.port}" in f.read()


def test_https_with_an_untrusted_certificate_fails(tls):
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls.url + "/health")  # the system's trust store does not hold the test's certificate


def test_plain_http_to_the_tls_port_fails(tls):
    try:
        response = httpx.get(f"http://127.0.0.1:{tls.port}/health", timeout=10)
    except httpx.TransportError:
        return
    assert response.status_code != 200, "plain HTTP was served on the HTTPS port"


def test_metrics_public_leaves_the_rest_keyed(tls):
    with httpx.Client(verify=tls.context, timeout=60) as client:
        metrics = client.get(tls.url + "/metrics")
        assert metrics.status_code == 200 and "ember:num_requests_running" in metrics.text
        assert_401(client.get(tls.url + "/v1/models"))
        assert_401(client.get(tls.url + "/docs"))
        assert client.get(tls.url + "/v1/models", headers=bearer(TLS_KEY)).status_code == 200


# ---- drain: runs last, it stops the TLS server ------------------------------------------------------------
def test_health_is_503_while_draining(tls):
    events: list = []
    first_token = threading.Event()
    body = {**COMPLETION, "prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": True, "stream": True}

    def read_stream():
        with httpx.stream("POST", tls.url + "/v1/completions", json=body, headers=bearer(TLS_KEY), verify=tls.context, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    first_token.set()
        first_token.set()

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    assert first_token.wait(60)
    tls.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with httpx.Client(verify=tls.context, timeout=10) as client:
        health = client.get(tls.url + "/health")
        assert health.status_code == 503 and health.headers["Retry-After"]
        late = client.post(tls.url + "/v1/completions", json=COMPLETION, headers=bearer(TLS_KEY))
        assert late.status_code == 503
        # the drain does not open the door: no key is still a 401
        assert_401(client.get(tls.url + "/v1/models"))
    assert tls.process.wait(timeout=DRAIN_TIMEOUT + 20) == 0, tls.log()
    reader.join(10)
    assert events[-1] == "[DONE]" and "shut down" in events[-2], events[-3:]
