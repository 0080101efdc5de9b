"""Serving benchmark: Ember's HTTP server vs llama.cpp's, under concurrent streaming load, in one run.

Starts each server on the same GGUF (the embedded SmolLM2) with the same thread count, then at each
concurrency level (default 1, 4, 16) keeps that many streaming /v1/completions requests in flight and
reports requests/s, output tokens/s, time to first token and inter-token latency (p50 / p95), then
Ember's figure over each peer's. With --structured (issue #7), each server also runs every level with each
request constrained to a JSON schema (Ember: vLLM's `structured_outputs`; llama-server: its `json_schema`),
reported beside the unconstrained rows, and Ember's schema compile time (first and cached) is measured in-process. Peers, when found (see ../shared/peers/setup.sh, `source env.sh`):
  llama-cpp-python  `python -m llama_cpp.server`: one request at a time
  llama-server      llama.cpp's own server, with --parallel slots and continuous batching (the strong peer)
Not a test: run it with nothing else on the machine.

    .venv/bin/python benchmarks/serving.py [--concurrency 1 4 16] [--max-tokens 64] [--threads 2]
        [--llamacpp-py $LLAMACPP_PY] [--llama-server $LLAMA_SERVER] [--servers ember llama-server llama-cpp-python]
        [--structured]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass, field

import httpx

# The --structured rows' schema: long enough to fill ~64 tokens, bounded so it always closes.
RECORD_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 6},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 200},
    },
    "required": ["title", "tags", "rating", "summary"],
}
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompt(salt: int, num_words: int) -> str:
    return "Continue this story: " + " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(num_words))


@dataclass
class ServerProcess:
    """A server started as a subprocess (its output in a temporary log file), ready once it answers."""

    name: str
    command: list[str]
    port: int
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    log: tempfile._TemporaryFileWrapper | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix=f"ember_bench_{self.name}_", suffix=".log", delete=False)
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {' '.join(self.command)}\n{self.log_tail()}")
            try:  # llama-server answers /health with 503 while it loads; llama-cpp-python has only /v1/models
                health = httpx.get(self.url + "/health", timeout=1).status_code
                if health == 200 or (health == 404 and httpx.get(self.url + "/v1/models", timeout=1).status_code == 200):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, num_chars: int = 3000) -> str:
        if self.log is None:
            return ""
        with open(self.log.name, errors="replace") as f:
            return f.read()[-num_chars:]


@dataclass
class Peer(ServerProcess):
    model: str = ""
    extra_body: dict = field(default_factory=dict)  # what makes each request generate exactly max_tokens
    schema_body: dict | None = None  # what constrains a request to RECORD_SCHEMA (None: not supported)


@dataclass
class RequestResult:
    ttft: float
    itls: list[float]
    num_tokens: int


async def one_request(client: httpx.AsyncClient, peer: Peer, prompt: str, max_tokens: int, structured: bool) -> RequestResult:
    body = {"model": peer.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(peer.schema_body if structured else peer.extra_body)
    start = time.perf_counter()
    times = []
    async with client.stream("POST", peer.url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[len("data:"):])
            if event.get("choices") and event["choices"][0].get("text"):
                times.append(time.perf_counter())  # one streamed piece per token in all three servers
    if not times:
        raise RuntimeError(f"{peer.name} streamed no text")
    return RequestResult(times[0] - start, [b - a for a, b in zip(times, times[1:])], len(times))


async def run_level(peer: Peer, concurrency: int, num_requests: int, max_tokens: int, prompt_words: int,
                    structured: bool = False) -> dict:
    prompts = [make_prompt(i, prompt_words) for i in range(num_requests)]
    if structured:
        prompts = [p.replace("Continue this story:", "Describe this story as a JSON record:") for p in prompts]
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker():
            while not queue.empty():
                results.append(await one_request(client, peer, queue.get_nowait(), max_tokens, structured))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = sorted(r.ttft for r in results)
    itls = sorted(x for r in results for x in r.itls)
    return {
        "req/s": len(results) / elapsed,
        "tok/s": sum(r.num_tokens for r in results) / elapsed,
        "ttft p50": quantile(ttfts, 0.5), "ttft p95": quantile(ttfts, 0.95),
        "itl p50": quantile(itls, 0.5), "itl p95": quantile(itls, 0.95),
    }


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


COLUMNS = ["req/s", "tok/s", "ttft p50", "ttft p95", "itl p50", "itl p95"]
HIGHER_IS_BETTER = {"req/s", "tok/s"}


def print_table(rows: dict[tuple[int, str], dict], concurrencies: list[int], names: list[str]) -> None:
    header = f"{'conc':>4}  {'server':<28}" + "".join(f"{c:>11}" for c in COLUMNS)
    print(header)
    print("-" * len(header))
    for c in concurrencies:
        for name in names:
            if (c, name) in rows:
                r = rows[(c, name)]
                cells = "".join(f"{r[k]:>11.2f}" if k in HIGHER_IS_BETTER else f"{r[k] * 1000:>9.0f}ms" for k in COLUMNS)
                print(f"{c:>4}  {name:<28}{cells}")
        if (c, "ember") in rows:
            for name in names:
                if name != "ember" and (c, name) in rows:
                    e, p = rows[(c, "ember")], rows[(c, name)]
                    cells = "".join(f"{e[k] / p[k]:>10.2f}x" if p[k] else f"{'-':>11}" for k in COLUMNS)
                    print(f"{c:>4}  {'ember / ' + name:<28}{cells}")
        print()
    print("ratios: req/s and tok/s above 1 favour Ember; ttft and itl below 1 favour Ember.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: max(4, 2 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048, help="context per request")
    parser.add_argument("--gguf", default=os.environ.get("SMOLLM2_GGUF"))
    parser.add_argument("--llamacpp-py", default=os.environ.get("LLAMACPP_PY"))
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--servers", nargs="+", default=["ember", "llama-server", "llama-cpp-python"])
    parser.add_argument("--ember-flags", default="", help='extra `ember serve` flags, e.g. "--no-batch-invariant"')
    parser.add_argument("--structured", action="store_true", help="also run each level with JSON-schema-constrained requests")
    args = parser.parse_args()

    from ember.loader.hub import embedded_model_path

    gguf = args.gguf or embedded_model_path()
    slots = max(args.concurrency)
    peers = []
    if "ember" in args.servers:
        port = free_port()
        peers.append(Peer("ember", [sys.executable, "-m", "ember", "serve", gguf, "--port", str(port), "--served-model-name", "m",
                                    "--num-threads", str(args.threads), "--max-model-len", str(args.ctx), *args.ember_flags.split()],
                          port, "m", {"ignore_eos": True}, {"structured_outputs": {"json": RECORD_SCHEMA}}))
    if "llama-server" not in args.servers:
        pass
    elif args.llama_server and os.path.exists(args.llama_server):
        port = free_port()
        peers.append(Peer("llama-server", [args.llama_server, "-m", gguf, "--port", str(port), "-t", str(args.threads),
                                           "-c", str(args.ctx * slots), "--parallel", str(slots), "--cont-batching"],
                          port, "m", {"ignore_eos": True}, {"json_schema": RECORD_SCHEMA}))
    else:
        print("llama-server not found (../shared/peers/setup.sh llamacpp builds it); skipping it", file=sys.stderr)
    if "llama-cpp-python" not in args.servers:
        pass
    elif args.llamacpp_py and os.path.exists(args.llamacpp_py):
        port = free_port()
        # llama-cpp-python has no ignore_eos: its requests may stop early; tok/s counts what it streamed.
        # --interrupt_requests False: queue concurrent requests instead of cutting the running stream.
        peers.append(Peer("llama-cpp-python", [args.llamacpp_py, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                                               "--n_threads", str(args.threads), "--n_ctx", str(args.ctx), "--model_alias", "m",
                                               "--interrupt_requests", "False"],
                          port, "m"))
    else:
        print("llama-cpp-python not found; skipping it", file=sys.stderr)

    rows: dict[tuple[int, str], dict] = {}
    names, failures = [], []
    for peer in peers:  # one server at a time, so they never share the cores
        print(f"{peer.name}: starting", file=sys.stderr)
        peer.start()
        try:
            kinds = [False] + ([True] if args.structured and peer.schema_body is not None else [])
            for structured in kinds:
                asyncio.run(run_level(peer, 1, 1, 8, args.prompt_words, structured))  # warm-up (and schema compile)
                name = peer.name + (" json-schema" if structured else "")
                names.append(name)
                for c in args.concurrency:
                    num_requests = args.requests or max(4, 2 * c)
                    try:
                        rows[(c, name)] = asyncio.run(run_level(peer, c, num_requests, args.max_tokens, args.prompt_words, structured))
                    except httpx.HTTPError as exc:  # a peer that fails a level is reported, not fatal
                        failures.append(f"{name} c={c}: {type(exc).__name__}: {exc}")
                        print(f"{failures[-1]}\n{peer.log_tail(1500)}", file=sys.stderr)
                        continue
                    print(f"{name} c={c}: {rows[(c, name)]}", file=sys.stderr)
        finally:
            peer.stop()
    print(f"\nstreaming /v1/completions, {args.max_tokens} new tokens per request, ~{args.prompt_words + 4}-word prompts, "
          f"{args.threads} threads, {os.path.basename(gguf)}{', ember ' + args.ember_flags if args.ember_flags else ''}\n")
    print_table(rows, args.concurrency, names)
    for failure in failures:
        print("failed:", failure)
    if args.structured:
        print_structured(rows, args.concurrency, names)
        print_compile_times(gguf)
    return 0


def print_structured(rows: dict[tuple[int, str], dict], concurrencies: list[int], names: list[str]) -> None:
    print("\nJSON-schema-constrained over unconstrained, same server (tok/s; itl p50):")
    for name in names:
        if name.endswith(" json-schema"):
            plain = name.removesuffix(" json-schema")
            for c in concurrencies:
                if (c, name) not in rows or (c, plain) not in rows:
                    continue
                s, p = rows[(c, name)], rows[(c, plain)]
                print(f"  {plain:<18} c={c:<3} tok/s {s['tok/s']:7.2f} / {p['tok/s']:7.2f} = {s['tok/s'] / p['tok/s']:.2f}x;"
                      f"  itl p50 {s['itl p50'] * 1000:5.0f} / {p['itl p50'] * 1000:5.0f} ms")


def print_compile_times(gguf: str, repeats: int = 5) -> None:
    """Ember's schema compilation, in this process: the first (with xgrammar's import and tokenizer tables),
    a new schema once warm, and a cached one."""
    from ember.engine.structured_output import StructuredOutputManager
    from ember.loader import read_gguf_metadata
    from ember.sampling_params import StructuredOutputsParams
    from ember.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf_metadata(gguf))
    manager = StructuredOutputManager(tokenizer, tokenizer.backend.get_vocab_size())

    def timed(schema: dict) -> float:
        start = time.perf_counter()
        manager.compile(StructuredOutputsParams(json=schema))
        return 1000 * (time.perf_counter() - start)

    first = timed(RECORD_SCHEMA)
    new = [timed({**RECORD_SCHEMA, "title": f"variant {i}"}) for i in range(repeats)]
    cached = [timed(RECORD_SCHEMA) for _ in range(repeats)]
    print(f"\nEmber schema compile (ms): first {first:.0f} (incl. xgrammar import); new schema median "
          f"{statistics.median(new):.1f} ({min(new):.1f}-{max(new):.1f}); cached median {statistics.median(cached):.3f}")


if __name__ == "__main__":
    sys.exit(main())
