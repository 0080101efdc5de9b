"""Soak benchmark (issue #23, "Hardening"): many concurrent streams over a mix of protocols for a long time,
with a small share of hostile requests mixed in, against a real `python -m ember serve` process.

    .venv/bin/python benchmarks/soak.py [--streams 64] [--duration 600] [--hostile-rate 0.01] [--seed 0]
        [--model PATH] [--server-arg=--max-num-seqs=64 ...] [--out soak.json]
        [--phases clean hostile] [--hostile-kinds seed_2_64 slow_loris ...] [--fresh-server]

Phases. The clean phase sends well-formed requests only; the hostile phase sends the same well-formed load,
except that each worker replaces ~`--hostile-rate` of its requests by a hostile one (the kinds taken in a
seeded shuffled cycle, so a short run still meets each of them). Both phases run, by default, against the
SAME server process, clean first: a server that takes hostile traffic is a long-running server, so what the
hostile phase costs is measured against a server already warmed by the clean phase, the RSS series of the
whole run tells whether hostile requests leave memory behind, and one model load is saved. The price is an
order effect (a warmer prefix cache in the hostile phase), which the warm-up cut below mostly removes.
`--fresh-server` starts one server per phase instead (independent phases, RSS judged per phase only).

Load. `--streams` worker coroutines share one httpx.AsyncClient per phase (hostile requests have their own
client, so their connections never land in the well-formed pool). Each worker loops: it picks a protocol
with its own seeded RNG and sends one well-formed request (16-48 tokens, greedy or seeded sampling, one
in ten with a ~400-token preamble), reads the whole answer, and records the latency (from send to the last
byte) and whether the answer ended normally:
    chat        POST /v1/chat/completions, stream: 200, a chunk with finish_reason, no `error` event, `data: [DONE]` last
    completion  POST /v1/completions, stream: the same
    fim         POST /v1/completions with `suffix` (fill-in-the-middle), stream: the same
    ollama_chat POST /api/chat (NDJSON): 200, no `error` line, a last line with "done": true
    ollama_gen  POST /api/generate (NDJSON): the same
    tgi_stream  POST /generate_stream (SSE): 200, no `error` event, a last event whose generated_text is a string
    tgi         POST /generate: 200, JSON with a string generated_text
    infill      POST /infill (llama.cpp): 200, JSON with a string content and "stop": true
A well-formed request that times out (`--request-timeout`), fails to connect, or is cut is an error.
Well-formed errors are counted over the whole phase, warm-up included.

Hostile kinds (`--hostile-kinds`; each with its own `--hostile-timeout`, latency not in the well-formed
figures; the outcome of each is tallied: the status code, "timeout", "conn:<error>", ...):
    seed_2_64             /v1/completions with seed 2**64
    n_million             /v1/completions with n = 1000000
    body_20mb             a 20 MB prompt body (sent over a raw socket, so an early 413 is seen, not a broken pipe)
    stop_10000            10000 stop strings
    regex_1mb_so          a ~0.7 MB regex alternation in `structured_outputs.regex` (/v1/completions)
    regex_1mb_guided      the same in `guided_regex` (/v1/chat/completions)
    lone_surrogate        a chat message holding the JSON escape \\ud800 (raw bytes; json.dumps writes the same escape)
    invalid_utf8          a body with bytes that are not UTF-8
    temperature_infinity  /completion with `"temperature": Infinity` (raw JSON text)
    text_plain_evil_origin a Content-Type: text/plain chat POST with Origin: http://evil.example ("+ACAO" if it is allowed)
    host_evil             a completion with Host: evil.example
    malformed_json        a truncated JSON body
    prompt_empty_list     prompt = []
    max_tokens_negative   max_tokens = -1
    stalled_reader        opens a 1024-token stream on a socket with a tiny receive buffer, reads its head, stops
                          reading for 2/3 of the hostile timeout, then closes
    slow_loris            sends half the headers and waits: "408"/"closed" when the server ends it, "still_open" if not
A 5xx or a connection error on a hostile request is a failure; timeouts are listed beside them.

Sampling. Every `--sample-interval` s (5) a sampler records the server's RSS (/proc/PID/status VmRSS) and the
latency of GET /health (a fresh connection each time; a non-200 or no answer in 10 s is a failure). It also
stops the run if the server dies (its log's tail is printed) or passes `--rss-limit-mib`.

Warm-up. The first `--warmup` s (30; at most a third of a phase) of each phase are left out of that phase's
latency figures (requests that started in them) and of its RSS baseline (the first sample after them).

Targets, checked at the end (PASS/FAIL): 0 well-formed errors; p99 latency of the hostile phase within 1.2x
the clean one's; RSS flat within 10% ((max - first after warm-up) / first after warm-up, per phase and, on one
server, over the whole run from the clean phase's baseline); no hostile 5xx or connection errors; no
/health failures. Exit status: 0 all pass, 1 a check failed, 2 the server failed to start or died.
Not a test: run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import httpx

MODEL_NAME = "smollm2"
HOST = "127.0.0.1"

TOPICS = ["the sea", "a lighthouse", "autumn leaves", "a small robot", "coffee", "the mountains", "an old library",
          "rain at night", "a train journey", "the moon", "a garden", "winter"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
PREAMBLE = "Background notes: " + " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(400)) + "\n\n"
CODE = [  # (prefix, suffix) for the fill-in-the-middle requests
    ("def fib(n):\n    ", "\n\nprint(fib(10))\n"),
    ("def is_prime(n: int) -> bool:\n    ", "\n"),
    ("class Stack:\n    def __init__(self):\n        ", "\n\n    def push(self, x):\n        self.items.append(x)\n"),
    ("import json\n\ndef load(path):\n    ", "\n"),
]


# ---- the server ------------------------------------------------------------------------------------
class Server:
    """`python -m ember serve` on a free port, its output in a temporary log file."""

    def __init__(self, model: str | None, extra_args: list[str]):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.command = [sys.executable, "-m", "ember", "serve", *([model] if model else []), "--port", str(self.port),
                        "--served-model-name", MODEL_NAME, *extra_args]
        self.log = tempfile.NamedTemporaryFile(prefix="ember_soak_", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        print(f"starting: {' '.join(self.command)}\n  log: {self.log.name}", flush=True)
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ember serve did not become healthy in {timeout:.0f} s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_kib(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None

    def stop(self) -> int | None:
        """SIGTERM (the server drains for up to its --drain-timeout), then SIGKILL."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def log_tail(self, num_chars: int = 5000) -> str:
        return self.log_text()[-num_chars:]


# ---- records -----------------------------------------------------------------------------------------
@dataclass
class Record:
    """One well-formed request."""

    protocol: str
    start: float  # seconds since the phase began
    latency: float  # from send to the last byte
    ok: bool
    status: int | None
    detail: str = ""  # why it is not ok
    tokens: int | None = None  # output tokens, where the protocol reports them


@dataclass
class HostileRecord:
    kind: str
    start: float
    seconds: float
    outcome: str  # "400", "timeout", "conn:ReadError", "still_open", ...

    @property
    def is_failure(self) -> bool:
        return self.outcome[:1] == "5" or self.outcome.startswith("conn:")


@dataclass
class Sample:
    t: float  # seconds since the phase began
    rss_mib: float | None
    health_s: float | None  # None: failed
    health: str  # "200", "503", "timeout", ...


@dataclass
class Phase:
    name: str
    duration: float
    warmup: float
    records: list[Record] = field(default_factory=list)
    hostile: list[HostileRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    elapsed: float = 0.0
    stopped: str | None = None  # why the phase ended early


# ---- well-formed requests: (status, ok, detail, tokens) ---------------------------------------------
def _sampling(rng: random.Random) -> tuple[float, int | None]:
    """Greedy half the time, else seeded sampling at 0.8."""
    return (0.0, None) if rng.random() < 0.5 else (0.8, rng.randrange(2**31))


def _chat_text(rng: random.Random) -> str:
    return (PREAMBLE if rng.random() < 0.1 else "") + f"Write one sentence about {rng.choice(TOPICS)}."


def _story_text(rng: random.Random) -> str:
    return (PREAMBLE if rng.random() < 0.1 else "") + f"Here is a short story about {rng.choice(TOPICS)}. Once upon a time,"


def _sse_data(line: str) -> str | None:
    if not line.startswith("data:"):
        return None
    data = line[5:]
    return data[1:] if data.startswith(" ") else data


async def _bad_status(response: httpx.Response) -> tuple[int, bool, str, None]:
    body = (await response.aread())[:300].decode(errors="replace")
    return response.status_code, False, f"HTTP {response.status_code}: {body}", None


async def _openai_stream(client: httpx.AsyncClient, path: str, body: dict):
    """An OpenAI SSE stream: chunks, at least one finish_reason, no error event, `data: [DONE]` last."""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return await _bad_status(response)
        is_done, finish, error, tokens, after_done = False, None, None, None, False
        async for line in response.aiter_lines():
            data = _sse_data(line)
            if data is None:
                continue
            if is_done:
                after_done = True
            if data == "[DONE]":
                is_done = True
                continue
            event = json.loads(data)
            if "error" in event:
                error = json.dumps(event["error"])[:300]
            for choice in event.get("choices") or []:
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
    if error is not None:
        return 200, False, f"error event: {error}", tokens
    if not is_done or after_done:
        return 200, False, "stream did not end with data: [DONE]", tokens
    if finish is None:
        return 200, False, "no chunk with a finish_reason", tokens
    return 200, True, "", tokens


async def wf_chat(client, rng):
    temperature, seed = _sampling(rng)
    return await _openai_stream(client, "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": _chat_text(rng)}],
        "max_tokens": rng.randint(16, 48), "temperature": temperature, "seed": seed,
        "stream": True, "stream_options": {"include_usage": True},
    })


async def wf_completion(client, rng):
    temperature, seed = _sampling(rng)
    return await _openai_stream(client, "/v1/completions", {
        "model": MODEL_NAME, "prompt": _story_text(rng), "max_tokens": rng.randint(16, 48),
        "temperature": temperature, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
    })


async def wf_fim(client, rng):
    temperature, seed = _sampling(rng)
    prefix, suffix = rng.choice(CODE)
    return await _openai_stream(client, "/v1/completions", {
        "model": MODEL_NAME, "prompt": prefix, "suffix": suffix, "max_tokens": rng.randint(16, 48),
        "temperature": temperature, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
    })


async def _ollama_stream(client: httpx.AsyncClient, path: str, body: dict):
    """Ollama NDJSON: no `error` line, the last line "done": true."""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return await _bad_status(response)
        last, error = None, None
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            last = json.loads(line)
            if "error" in last:
                error = str(last["error"])[:300]
    if error is not None:
        return 200, False, f"error line: {error}", None
    if not last or last.get("done") is not True:
        return 200, False, "no last line with done: true", None
    return 200, True, "", last.get("eval_count")


def _ollama_options(rng: random.Random) -> dict:
    temperature, seed = _sampling(rng)
    options = {"num_predict": rng.randint(16, 48), "temperature": temperature}
    if seed is not None:
        options["seed"] = seed
    return options


async def wf_ollama_chat(client, rng):
    return await _ollama_stream(client, "/api/chat", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": _chat_text(rng)}], "options": _ollama_options(rng),
    })


async def wf_ollama_generate(client, rng):
    return await _ollama_stream(client, "/api/generate", {"model": MODEL_NAME, "prompt": _chat_text(rng), "options": _ollama_options(rng)})


def _tgi_body(rng: random.Random) -> dict:
    temperature, seed = _sampling(rng)
    parameters = {"max_new_tokens": rng.randint(16, 48)}
    if seed is not None:
        parameters.update(do_sample=True, temperature=temperature, seed=seed)
    return {"inputs": _story_text(rng), "parameters": parameters}


async def wf_tgi_stream(client, rng):
    """TGI SSE (`data:{...}`): one event per token, the last with a string generated_text; no error event."""
    async with client.stream("POST", "/generate_stream", json=_tgi_body(rng)) as response:
        if response.status_code != 200:
            return await _bad_status(response)
        last, error, num_tokens = None, None, 0
        async for line in response.aiter_lines():
            data = _sse_data(line)
            if data is None:
                continue
            last = json.loads(data)
            if "error" in last:
                error = str(last["error"])[:300]
            elif "token" in last:
                num_tokens += 1
    if error is not None:
        return 200, False, f"error event: {error}", num_tokens
    if not last or not isinstance(last.get("generated_text"), str):
        return 200, False, "no last event with generated_text", num_tokens
    return 200, True, "", num_tokens


async def _json_post(client: httpx.AsyncClient, path: str, body: dict) -> tuple[httpx.Response, object]:
    response = await client.post(path, json=body)
    return response, (response.json() if response.status_code == 200 else None)


async def wf_tgi(client, rng):
    response, answer = await _json_post(client, "/generate", _tgi_body(rng))
    if response.status_code != 200:
        return response.status_code, False, f"HTTP {response.status_code}: {response.text[:300]}", None
    if not isinstance(answer, dict) or not isinstance(answer.get("generated_text"), str):
        return 200, False, f"no generated_text: {response.text[:300]}", None
    return 200, True, "", None  # no token count without `details`


async def wf_infill(client, rng):
    temperature, seed = _sampling(rng)
    body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "n_predict": 16, "temperature": temperature}
    if seed is not None:
        body["seed"] = seed
    response, answer = await _json_post(client, "/infill", body)
    if response.status_code != 200:
        return response.status_code, False, f"HTTP {response.status_code}: {response.text[:300]}", None
    if not isinstance(answer, dict) or not isinstance(answer.get("content"), str) or answer.get("stop") is not True:
        return 200, False, f"no content / stop: {response.text[:300]}", None
    return 200, True, "", answer.get("tokens_predicted")


WELL_FORMED = {
    "chat": wf_chat, "completion": wf_completion, "fim": wf_fim, "ollama_chat": wf_ollama_chat,
    "ollama_gen": wf_ollama_generate, "tgi_stream": wf_tgi_stream, "tgi": wf_tgi, "infill": wf_infill,
}


# ---- hostile requests: each returns its outcome ------------------------------------------------------
class Hostile:
    """The hostile requests, sent on their own client (and raw sockets where httpx would hide the answer)."""

    def __init__(self, client: httpx.AsyncClient, port: int, timeout: float):
        self.client = client
        self.port = port
        self.timeout = timeout
        self._big_body: bytes | None = None
        self._regex: str | None = None

    @property
    def regex(self) -> str:
        if self._regex is None:
            self._regex = "(" + "|".join(f"a{i}" for i in range(100000)) + ")"
        return self._regex

    async def _post(self, path: str, body: dict | bytes, headers: dict | None = None) -> str:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        if isinstance(body, bytes):
            headers = {"Content-Type": "application/json", **(headers or {})}
        response = await self.client.post(path, headers=headers, **kwargs)
        return str(response.status_code)

    async def seed_2_64(self):
        return await self._post("/v1/completions", {"model": MODEL_NAME, "prompt": "Hello", "seed": 2**64, "max_tokens": 8, "temperature": 0.8})

    async def n_million(self):
        return await self._post("/v1/completions", {"model": MODEL_NAME, "prompt": "Hello", "n": 1_000_000, "max_tokens": 8})

    async def body_20mb(self):
        if self._big_body is None:
            words = b"hello " * (20 * 2**20 // 6)
            self._big_body = b'{"model": "' + MODEL_NAME.encode() + b'", "prompt": "' + words + b'", "max_tokens": 8}'
        return await raw_http(self.port, "/v1/completions", self._big_body, {"Content-Type": "application/json"}, self.timeout - 1)

    async def stop_10000(self):
        return await self._post("/v1/completions", {
            "model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8, "stop": [f"stop{i}" for i in range(10000)],
        })

    async def regex_1mb_so(self):
        return await self._post("/v1/completions", {
            "model": MODEL_NAME, "prompt": "Say a word:", "max_tokens": 8, "structured_outputs": {"regex": self.regex},
        })

    async def regex_1mb_guided(self):
        return await self._post("/v1/chat/completions", {
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "Say a word."}], "max_tokens": 8,
            "guided_regex": self.regex,
        })

    async def lone_surrogate(self):
        # the JSON escape itself (json.dumps("\ud800") writes the same six characters, as ensure_ascii does)
        body = rb'{"model": "smollm2", "messages": [{"role": "user", "content": "hi \ud800 there"}], "max_tokens": 8}'
        return await self._post("/v1/chat/completions", body)

    async def invalid_utf8(self):
        return await self._post("/v1/completions", b'{"model": "smollm2", "prompt": "hi \xff\xfe\xc3 there", "max_tokens": 8}')

    async def temperature_infinity(self):
        return await self._post("/completion", b'{"prompt": "Hello", "temperature": Infinity, "n_predict": 8}')

    async def text_plain_evil_origin(self):
        body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}).encode()
        response = await self.client.post("/v1/chat/completions", content=body,
                                          headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        allowed = response.headers.get("access-control-allow-origin")
        return str(response.status_code) + (f"+ACAO:{allowed}" if allowed else "")

    async def host_evil(self):
        return await self._post("/v1/completions", {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8}, {"Host": "evil.example"})

    async def malformed_json(self):
        return await self._post("/v1/chat/completions", b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}')

    async def prompt_empty_list(self):
        return await self._post("/v1/completions", {"model": MODEL_NAME, "prompt": [], "max_tokens": 8})

    async def max_tokens_negative(self):
        return await self._post("/v1/completions", {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": -1})

    async def stalled_reader(self):
        """A long stream read through a 4 KiB socket buffer and a 1 KiB reader: the head, then no reading."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (HOST, self.port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        try:
            body = json.dumps({"model": MODEL_NAME, "prompt": "Count from one to a thousand:", "max_tokens": 1024,
                               "ignore_eos": True, "stream": True}).encode()
            writer.write(_request_head(self.port, "/v1/completions", len(body), {"Content-Type": "application/json"}) + body)
            await writer.drain()
            status_line = await reader.readline()
            await reader.read(64)  # a few bytes, then stop reading
            await asyncio.sleep(self.timeout * 2 / 3)
            return _status(status_line)
        finally:
            writer.close()

    async def slow_loris(self):
        """Half of a request's headers, then nothing: does the server end the connection?"""
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nContent-Type: appl".encode())
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(1024), self.timeout - 1)
            except asyncio.TimeoutError:
                return "still_open"
            return _status(data) if data else "closed"
        finally:
            writer.close()


HOSTILE_KINDS = [
    "seed_2_64", "n_million", "body_20mb", "stop_10000", "regex_1mb_so", "regex_1mb_guided", "lone_surrogate",
    "invalid_utf8", "temperature_infinity", "text_plain_evil_origin", "host_evil", "malformed_json",
    "prompt_empty_list", "max_tokens_negative", "stalled_reader", "slow_loris",
]


def _request_head(port: int, path: str, content_length: int, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}", f"Content-Length: {content_length}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(data: bytes) -> str:
    parts = data.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "closed" if not data else "garbage"


async def raw_http(port: int, path: str, body: bytes, headers: dict, timeout: float) -> str:
    """POSTs `body` over a plain blocking socket (in a thread), then reads the answer's status line. A server that
    answers early (a 413 before reading the body) and closes makes the upload fail; its answer still waits in
    the socket's receive queue, which the kernel keeps through the reset (asyncio's transport would drop it)."""
    return await asyncio.to_thread(_raw_http_blocking, port, path, body, headers, timeout)


def _raw_http_blocking(port: int, path: str, body: bytes, headers: dict, timeout: float) -> str:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        send_error = None
        try:
            sock.sendall(_request_head(port, path, len(body), headers))
            for i in range(0, len(body), 1 << 16):
                sock.sendall(body[i:i + (1 << 16)])
        except socket.timeout:
            return "timeout"
        except OSError as exc:
            send_error = exc
        try:
            data = sock.recv(4096)
        except socket.timeout:
            return "timeout"
        except OSError as exc:
            return f"conn:{type(send_error or exc).__name__}"
        return _status(data)


# ---- one phase ---------------------------------------------------------------------------------------
async def run_phase(phase: Phase, server: Server, args, hostile_rate: float, kinds: list[str]) -> None:
    """Fills `phase` as it runs (so an interrupted phase still has its figures so far)."""
    name, duration = phase.name, phase.duration
    t0 = time.monotonic()
    deadline = t0 + duration
    stop = asyncio.Event()
    cycle_rng = random.Random(f"{args.seed}-{name}-cycle")
    cycle: list[str] = []

    def next_kind() -> str:
        if not cycle:
            cycle.extend(cycle_rng.sample(kinds, len(kinds)))
        return cycle.pop()

    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(base_url=server.url, limits=limits, timeout=args.hostile_timeout) as hostile_client:
        hostile = Hostile(hostile_client, server.port, args.hostile_timeout)

        async def worker(index: int) -> None:
            rng = random.Random(f"{args.seed}-{name}-{index}")
            while time.monotonic() < deadline and not stop.is_set():
                start = time.monotonic()
                if kinds and rng.random() < hostile_rate:
                    kind = next_kind()
                    try:
                        outcome = await asyncio.wait_for(getattr(hostile, kind)(), args.hostile_timeout)
                    except (asyncio.TimeoutError, httpx.TimeoutException):
                        outcome = "timeout"
                    except (httpx.HTTPError, OSError) as exc:
                        outcome = f"conn:{type(exc).__name__}"
                    except Exception as exc:  # the client's own trouble (never the run's end)
                        outcome = f"client:{type(exc).__name__}"
                    phase.hostile.append(HostileRecord(kind, start - t0, time.monotonic() - start, outcome))
                    continue
                protocol = rng.choice(list(WELL_FORMED))
                try:
                    status, ok, detail, tokens = await asyncio.wait_for(WELL_FORMED[protocol](client, rng), args.request_timeout)
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    status, ok, detail, tokens = None, False, "timeout", None
                except (httpx.HTTPError, OSError) as exc:
                    status, ok, detail, tokens = None, False, f"{type(exc).__name__}: {exc}"[:300], None
                except Exception as exc:  # a malformed answer (bad JSON, ...)
                    status, ok, detail, tokens = 200, False, f"bad answer: {type(exc).__name__}: {exc}"[:300], None
                phase.records.append(Record(protocol, start - t0, time.monotonic() - start, ok, status, detail, tokens))

        async def sampler() -> None:
            async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_keepalive_connections=0)) as health_client:
                next_sample = time.monotonic()
                while not stop.is_set():
                    if not server.is_alive():
                        phase.stopped = f"the server exited with {server.process.returncode}"
                        stop.set()
                        return
                    rss = server.rss_kib()
                    if args.rss_limit_mib and rss is not None and rss / 1024 > args.rss_limit_mib:
                        phase.stopped = f"the server's RSS {rss / 1024:.0f} MiB passed --rss-limit-mib {args.rss_limit_mib}"
                        server.process.kill()
                        stop.set()
                        return
                    now = time.monotonic()
                    if now >= next_sample:
                        next_sample = now + args.sample_interval
                        try:
                            response = await health_client.get("/health", timeout=10)
                            health = str(response.status_code)
                        except httpx.TimeoutException:
                            health = "timeout"
                        except httpx.HTTPError as exc:
                            health = f"conn:{type(exc).__name__}"
                        latency = time.monotonic() - now
                        phase.samples.append(Sample(now - t0, None if rss is None else rss / 1024,
                                                    latency if health == "200" else None, health))
                    if time.monotonic() > deadline and all(w.done() for w in workers):
                        return
                    await asyncio.sleep(1)  # the RSS limit and the server's life are checked every second

        async def progress() -> None:
            while True:
                await asyncio.sleep(args.progress_interval)
                elapsed = time.monotonic() - t0
                errors = sum(not r.ok for r in phase.records)
                last = phase.samples[-1] if phase.samples else None
                rss = f"{last.rss_mib:.0f} MiB" if last and last.rss_mib else "?"
                health = f"{last.health_s:.3f} s" if last and last.health_s is not None else (last.health if last else "?")
                in_flight = "" if elapsed < duration else f", finishing {sum(not w.done() for w in workers)} in flight"
                print(f"[{name:7s} {elapsed:5.0f}/{duration:.0f} s] {len(phase.records)} well-formed done, {errors} errors, "
                      f"{len(phase.hostile)} hostile ({sum(h.is_failure for h in phase.hostile)} 5xx/conn); "
                      f"RSS {rss}; /health {health}{in_flight}", flush=True)

        workers = [asyncio.create_task(worker(i)) for i in range(args.streams)]
        sampler_task = asyncio.create_task(sampler())
        progress_task = asyncio.create_task(progress())
        try:
            # past the deadline, requests in flight finish (each has its own timeout) before the phase ends
            grace = max(args.request_timeout, args.hostile_timeout) + 30
            done_waiting = asyncio.create_task(asyncio.wait(workers))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([done_waiting, stopped], timeout=duration + grace, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            done_waiting.cancel()
        finally:
            phase.elapsed = time.monotonic() - t0
            stop.set()
            for task in workers + [progress_task]:
                task.cancel()
            await asyncio.gather(*workers, progress_task, return_exceptions=True)
            await asyncio.gather(sampler_task, return_exceptions=True)


# ---- figures -----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    position = (len(values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def latency_stats(records: list[Record]) -> dict:
    latencies = [r.latency for r in records]
    return {"n": len(records), "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "max": max(latencies) if latencies else None}


def rss_drift(samples: list[Sample], baseline_after: float) -> tuple[float | None, float | None]:
    """(first RSS at or after `baseline_after`, (max - first) / first) over those samples."""
    series = [s.rss_mib for s in samples if s.t >= baseline_after and s.rss_mib is not None]
    if not series:
        return None, None
    return series[0], (max(series) - series[0]) / series[0]


def summarize(phase: Phase) -> dict:
    measured = [r for r in phase.records if r.start >= phase.warmup and r.ok]
    stats = latency_stats(measured)
    counted = [r for r in measured if r.tokens is not None]
    window = (max(r.start + r.latency for r in measured) - phase.warmup) if measured else 0
    rss = [s.rss_mib for s in phase.samples if s.rss_mib is not None]
    baseline, drift = rss_drift(phase.samples, phase.warmup)
    health = [s.health_s for s in phase.samples if s.health_s is not None]
    protocols = {}
    for protocol in WELL_FORMED:
        of_protocol = [r for r in phase.records if r.protocol == protocol]
        protocols[protocol] = {**latency_stats([r for r in of_protocol if r.start >= phase.warmup and r.ok]),
                               "requests": len(of_protocol), "errors": sum(not r.ok for r in of_protocol)}
    hostile = defaultdict(Counter)
    hostile_max_s: dict[str, float] = {}
    for h in phase.hostile:
        hostile[h.kind][h.outcome] += 1
        hostile_max_s[h.kind] = max(hostile_max_s.get(h.kind, 0.0), h.seconds)
    return {
        "name": phase.name, "duration_s": phase.duration, "warmup_s": phase.warmup, "elapsed_s": phase.elapsed,
        "stopped": phase.stopped,
        "requests": len(phase.records), "measured_requests": stats["n"],
        "errors": sum(not r.ok for r in phase.records),
        "error_details": Counter(f"{r.protocol}: {r.detail}" for r in phase.records if not r.ok).most_common(20),
        "p50_s": stats["p50"], "p99_s": stats["p99"], "max_s": stats["max"],
        # output tokens of the protocols that report them (all but TGI /generate) over the measured window
        "tokens_per_s": sum(r.tokens for r in counted) / window if window > 0 else None,
        "rss_start_mib": rss[0] if rss else None, "rss_end_mib": rss[-1] if rss else None,
        "rss_max_mib": max(rss) if rss else None, "rss_baseline_mib": baseline, "rss_drift": drift,
        "health_max_s": max(health) if health else None,
        "health_failures": sum(s.health_s is None for s in phase.samples),
        "hostile_sent": len(phase.hostile), "hostile_failures": sum(h.is_failure for h in phase.hostile),
        "hostile_timeouts": sum(h.outcome == "timeout" for h in phase.hostile),
        "hostile_outcomes": {kind: dict(c) for kind, c in hostile.items()}, "hostile_max_s": hostile_max_s,
        "protocols": protocols,
    }


def _f(value, fmt: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def checks(summaries: dict[str, dict], phases: dict[str, Phase], one_server: bool) -> list[tuple[str, str, str, bool | None]]:
    """(check, value, target, passed: None for information only)."""
    rows = []
    errors = sum(s["errors"] for s in summaries.values())
    rows.append(("well-formed errors", str(errors), "0", errors == 0))
    clean, hostile = summaries.get("clean"), summaries.get("hostile")
    if clean and hostile and clean["p50_s"] and hostile["p50_s"]:
        p50 = hostile["p50_s"] / clean["p50_s"]
        p99 = hostile["p99_s"] / clean["p99_s"]
        rows.append(("p50 hostile / clean", f"{p50:.2f}x", "(info)", None))
        rows.append(("p99 hostile / clean", f"{p99:.2f}x", "<= 1.2x", p99 <= 1.2))
    for name, s in summaries.items():
        rows.append((f"RSS drift, {name}", _pct(s["rss_drift"]), "<= 10%",
                     None if s["rss_drift"] is None else s["rss_drift"] <= 0.10))
    if one_server and "clean" in phases and len(phases) > 1:
        shifted, offset = [], 0.0  # the phases' samples on one clock, from the clean phase's baseline
        for phase in phases.values():
            shifted += [Sample(s.t + offset, s.rss_mib, s.health_s, s.health) for s in phase.samples]
            offset += phase.elapsed
        _, drift = rss_drift(shifted, phases["clean"].warmup)
        rows.append(("RSS drift, whole run", _pct(drift), "<= 10%", None if drift is None else drift <= 0.10))
    failures = sum(s["hostile_failures"] for s in summaries.values())
    if any(s["hostile_sent"] for s in summaries.values()):
        rows.append(("hostile 5xx / connection errors", str(failures), "0", failures == 0))
        timeouts = sum(s["hostile_timeouts"] for s in summaries.values())
        rows.append(("hostile timeouts", str(timeouts), "(info)", None))
    health = sum(s["health_failures"] for s in summaries.values())
    rows.append(("/health failures", str(health), "0", health == 0))
    return rows


def report(summaries: dict[str, dict], rows, server_log: str) -> None:
    print("\n## Soak: per phase (latency and RSS baseline after the warm-up; errors over the whole phase)\n")
    print("| phase | requests | measured | well-formed errors | p50 s | p99 s | max s | tokens/s* | RSS start MiB | "
          "RSS end | RSS max | RSS drift | /health max s | /health failures | hostile sent | hostile 5xx/conn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries.values():
        print(f"| {s['name']} | {s['requests']} | {s['measured_requests']} | {s['errors']} | {_f(s['p50_s'])} | "
              f"{_f(s['p99_s'])} | {_f(s['max_s'])} | {_f(s['tokens_per_s'], '.1f')} | {_f(s['rss_start_mib'], '.0f')} | "
              f"{_f(s['rss_end_mib'], '.0f')} | {_f(s['rss_max_mib'], '.0f')} | "
              f"{_pct(s['rss_drift'])} | {_f(s['health_max_s'])} | {s['health_failures']} | "
              f"{s['hostile_sent']} | {s['hostile_failures']} |")
    print("\n*tokens/s: output tokens of the protocols that report them (all but TGI /generate), measured window.")

    print("\n## Per protocol (p50 / p99 s, after the warm-up)\n")
    names = list(summaries)
    print("| protocol | " + " | ".join(f"{n} requests | {n} errors | {n} p50 | {n} p99" for n in names) + " |")
    print("|---|" + "---|---|---|---|" * len(names))
    for protocol in WELL_FORMED:
        cells = []
        for n in names:
            p = summaries[n]["protocols"][protocol]
            cells.append(f"{p['requests']} | {p['errors']} | {_f(p['p50'])} | {_f(p['p99'])}")
        print(f"| {protocol} | " + " | ".join(cells) + " |")

    hostile = [s for s in summaries.values() if s["hostile_sent"]]
    if hostile:
        print("\n## Hostile requests (outcome x count; max seconds)\n")
        print("| phase | kind | outcomes | max s |")
        print("|---|---|---|---|")
        for s in hostile:
            for kind in HOSTILE_KINDS:
                if kind in s["hostile_outcomes"]:
                    outcomes = ", ".join(f"{o} x{c}" for o, c in sorted(s["hostile_outcomes"][kind].items()))
                    print(f"| {s['name']} | {kind} | {outcomes} | {s['hostile_max_s'][kind]:.1f} |")

    for s in summaries.values():
        if s["error_details"]:
            print(f"\n## Well-formed errors, {s['name']} (most frequent first)\n")
            for detail, count in s["error_details"]:
                print(f"- {count} x {detail}")
        if s["stopped"]:
            print(f"\n**Phase {s['name']} stopped early: {s['stopped']}**")

    tracebacks = server_log.count("Traceback (most recent call last)")
    print(f"\nServer log: {tracebacks} tracebacks, {server_log.count(' 500 ')} lines with ' 500 '.")

    print("\n## Checks\n")
    print("| check | value | target | result |")
    print("|---|---|---|---|")
    for check, value, target, passed in rows:
        print(f"| {check} | {value} | {target} | {'-' if passed is None else 'PASS' if passed else 'FAIL'} |")


# ---- main --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file, HF folder or hub id (default: the embedded SmolLM2)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="an extra `ember serve` argument (repeatable; write --server-arg=--flag=value)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent workers (default 64)")
    parser.add_argument("--duration", type=float, default=600, help="seconds per phase (default 600)")
    parser.add_argument("--warmup", type=float, default=30, help="seconds left out of each phase's baselines (at most a third of it)")
    parser.add_argument("--hostile-rate", type=float, default=0.01, help="share of the hostile phase's requests that are hostile")
    parser.add_argument("--hostile-kinds", nargs="+", default=HOSTILE_KINDS, choices=HOSTILE_KINDS, metavar="KIND",
                        help=f"hostile kinds to send (default all: {' '.join(HOSTILE_KINDS)})")
    parser.add_argument("--phases", nargs="+", default=["clean", "hostile"], choices=["clean", "hostile"])
    parser.add_argument("--fresh-server", action="store_true", help="one server per phase instead of one for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=300, help="seconds a well-formed request may take")
    parser.add_argument("--hostile-timeout", type=float, default=30, help="seconds a hostile request may take")
    parser.add_argument("--sample-interval", type=float, default=5)
    parser.add_argument("--progress-interval", type=float, default=30)
    parser.add_argument("--rss-limit-mib", type=float, default=0, help="kill the server and stop past this RSS (0: no limit)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    servers: list[Server] = []

    def stop_servers() -> None:
        for s in servers:
            s.stop()

    atexit.register(stop_servers)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)

    phases: dict[str, Phase] = {}
    status = 0
    server: Server | None = None
    try:
        for name in args.phases:
            if server is None or args.fresh_server:
                if server is not None:
                    server.stop()
                server = Server(args.model, args.server_arg)
                servers.append(server)
                try:
                    server.start()
                except RuntimeError as exc:
                    print(f"{exc}\n--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
                    return 2
                print(f"server pid {server.pid} on {server.url}", flush=True)
            rate = args.hostile_rate if name == "hostile" else 0.0
            phases[name] = Phase(name, args.duration, warmup=min(args.warmup, args.duration / 3))
            print(f"phase {name}: {args.streams} streams, {args.duration:.0f} s (warm-up {phases[name].warmup:.0f} s), "
                  f"hostile rate {rate}", flush=True)
            asyncio.run(run_phase(phases[name], server, args, rate, args.hostile_kinds if rate else []))
            if phases[name].stopped:
                print(f"\nphase {name} stopped: {phases[name].stopped}\n--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
                status = 2
                break
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the server (figures so far below)", file=sys.stderr)
        status = 130
        for phase in phases.values():
            phase.stopped = phase.stopped or "interrupted"
    finally:
        stop_servers()
    log_text = "".join(s.log_text() for s in servers)
    if not phases:
        return status or 2

    summaries = {name: summarize(phase) for name, phase in phases.items()}
    rows = checks(summaries, phases, one_server=not args.fresh_server)
    report(summaries, rows, log_text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({
                "args": vars(args), "server_command": servers[0].command if servers else None,
                "server_logs": [s.log.name for s in servers],
                "summaries": summaries,
                "checks": [{"check": c, "value": v, "target": t, "passed": p} for c, v, t, p in rows],
                "samples": {name: [asdict(s) for s in phase.samples] for name, phase in phases.items()},
                "records": {name: [asdict(r) for r in phase.records] for name, phase in phases.items()},
                "hostile": {name: [asdict(h) for h in phase.hostile] for name, phase in phases.items()},
            }, f, indent=1)
        print(f"\nwrote {args.out}")
    if status:
        return status
    return 0 if all(p is not False for *_, p in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
