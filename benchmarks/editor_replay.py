"""Editor replay: a person typing through real source files with llama.vim, against Ember and llama.cpp's server.

Each document is a module of this interpreter's standard library with a few lines in its middle removed; the
replay types them back, and at every pause (after each word: a space, newline or punctuation mark) it sends a
streaming completion with the text before and after the cursor, as llama.vim builds it (the last 256 lines
before the cursor, the next 64 after; `--max-prefix-chars` drops whole lines from the top, decided once per
document so the prompt's start stays put while typing). A new request supersedes the one in flight: the client
closes the older connection first, as llama.vim does (`jobstop`); Ember also gets `X-Ember-Session`, so it
cancels the older one itself (and may answer the new one from the generation being typed through). Both
servers get the same requests at the same times; they run one after the other, never together.

  Ember      `python -m ember serve` (embedded SmolLM2), POST /infill with llama.vim's body (no FIM tokens in
             this model: Ember completes from the prefix alone)
  llama.cpp  `llama-server -np 4 --cache-reuse 256` on the same GGUF, POST /completion with the prefix as the
             prompt (its /infill answers 501 without FIM tokens)

Reports per server: time to first streamed text (TTFT) p50 / p95 over delivered completions, completions
delivered / superseded / without a token, prompt tokens computed vs reused (from each delivered completion's
final event, and from the servers' /metrics), and Ember's typed-ahead reuses; then Ember's figure over llama.cpp's.
Not a test: run it with nothing else on the machine. Progress goes to stderr, the table to stdout.

    source ~/.cache/ember-peers/env.sh
    .venv/bin/python benchmarks/editor_replay.py [--quick] [--servers ember llama.cpp] [--typing-s 0.25]
        [--line-pause-s 1.0] [--lines 8] [--modules textwrap shlex heapq fractions] [--repeats 1] [--out records.json]
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from serving import ServerProcess, free_port  # benchmarks/ is the script's folder

BOUNDARY = set(" \t\n.,:;()[]{}=+-*/%<>!&|^~'\"#@")
DEFAULT_MODULES = ["textwrap", "shlex", "heapq", "fractions"]
EMBER_COUNTERS = ["prompt_tokens", "prefix_cache_queries", "prefix_cache_hits", "completion_typed_ahead_reuses",
                  "completion_superseded"]
LLAMACPP_COUNTERS = ["prompt_tokens_total", "prompt_tokens_cached_total"]


# ---- the replay: documents, pauses, what llama.vim sends at each -------------------------------------------------
@dataclass
class Document:
    name: str
    head: str  # the file up to the removed region
    region: str  # the lines typed back
    tail: str  # the rest of the file
    first_line: int  # 0-based line of the region
    prefix_start_line: int  # `--max-prefix-chars`: the top line the prefix may start at, fixed for the document

    def pauses(self) -> list[int]:
        """Cursor offsets into `region` where the typist pauses: right after each word's end, and at the end."""
        offsets = [i + 1 for i, ch in enumerate(self.region) if ch in BOUNDARY and i > 0 and self.region[i - 1] not in BOUNDARY]
        if not offsets or offsets[-1] != len(self.region):
            offsets.append(len(self.region))
        return offsets

    def context(self, offset: int, prefix_lines: int, suffix_lines: int) -> tuple[str, str, str]:
        """(input_prefix, prompt, input_suffix) as llama.vim's `s:fim_ctx_local`: the lines before the cursor's, the
        cursor's line up to it, and the rest of its line plus the lines after. The document has an empty line where
        the region was, so the text after the cursor starts with a newline."""
        before = (self.head + self.region[:offset]).split("\n")
        after = ("\n" + self.tail).split("\n")
        cursor_line = len(before) - 1
        start = max(cursor_line - prefix_lines, self.prefix_start_line, 0)
        lines_before = before[start:cursor_line]
        input_prefix = "\n".join(lines_before) + "\n" if lines_before else ""
        input_suffix = after[0] + "\n" + "\n".join(after[1:1 + suffix_lines]) + "\n"
        return input_prefix, before[-1], input_suffix


def load_documents(modules: list[str], num_lines: int, max_prefix_chars: int, seed: int) -> list[Document]:
    rng = random.Random(seed)
    documents = []
    for module_name in modules:
        path = inspect.getsourcefile(importlib.import_module(module_name))
        with open(path, encoding="utf-8") as f:
            source = f.read()
        lines = source.splitlines(keepends=True)
        prose = {i for node in ast.walk(ast.parse(source))  # docstrings: typing prose is not what this measures
                 if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for i in range(node.lineno - 1, node.end_lineno)}
        prose |= {i for i, line in enumerate(lines) if line.lstrip().startswith("#")}
        # somewhere in the middle, in code: no comment or docstring line, at most one blank line
        candidates = [i for i in range(len(lines) * 2 // 5, len(lines) * 3 // 5)
                      if lines[i].strip() and not prose.intersection(range(i, i + num_lines))
                      and sum(not line.strip() for line in lines[i:i + num_lines]) <= 1]
        first = rng.choice(candidates)
        end = first + num_lines
        prefix_start = 0
        if max_prefix_chars > 0:  # the top line from which the prefix fits when the cursor reaches the region's end
            while sum(len(line) for line in lines[prefix_start:end]) > max_prefix_chars:
                prefix_start += 1
        documents.append(Document(os.path.basename(path), "".join(lines[:first]), "".join(lines[first:end]),
                                  "".join(lines[end:]), first, prefix_start))
    return documents


# ---- servers ------------------------------------------------------------------------------------------------------
@dataclass
class Server(ServerProcess):
    @property
    def is_ember(self) -> bool:
        return self.name == "ember"

    def counters(self) -> dict[str, float]:
        """The cumulative counters this benchmark reads from /metrics (Prometheus text), summed over labels."""
        names = EMBER_COUNTERS if self.is_ember else LLAMACPP_COUNTERS
        prefix = "ember:" if self.is_ember else "llamacpp:"
        wanted = {prefix + n + ("_total" if self.is_ember else ""): n for n in names}
        values = dict.fromkeys(names, 0.0)
        text = httpx.get(self.url + "/metrics", timeout=10).raise_for_status().text
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            series, _, value = line.rpartition(" ")
            metric = series.split("{", 1)[0]
            if metric in wanted:
                values[wanted[metric]] += float(value)
        return values


def request_for(server: Server, input_prefix: str, prompt: str, input_suffix: str, args) -> tuple[str, dict]:
    common = {"n_predict": args.n_predict, "stream": True, "cache_prompt": True, "t_max_predict_ms": args.t_max_predict_ms,
              "temperature": args.temperature}
    if server.is_ember:
        return "/infill", {"input_prefix": input_prefix, "input_suffix": input_suffix, "input_extra": [], "prompt": prompt, **common}
    return "/completion", {"prompt": input_prefix + prompt, **common}


# ---- one request, one replay --------------------------------------------------------------------------------------
@dataclass
class Record:
    server: str
    repeat: int
    document: str
    index: int  # the pause's number within the document
    cursor: int  # characters of the region typed
    sent_s: float  # since the replay started
    prompt_chars: int
    outcome: str = "pending"  # delivered (got its final event) | superseded (cancelled before it) | error
    status_code: int | None = None
    ttft_s: float | None = None  # to the first non-empty streamed content
    end_s: float | None = None  # to the final event
    text: str = ""
    prompt_n: int | None = None  # final event: prompt tokens computed
    cache_n: int | None = None  # final event: prompt tokens reused
    tokens_evaluated: int | None = None
    tokens_predicted: int | None = None
    error: str | None = None


async def send(client: httpx.AsyncClient, server: Server, path: str, body: dict, headers: dict, record: Record) -> None:
    start = time.perf_counter()
    try:
        async with client.stream("POST", server.url + path, json=body, headers=headers) as response:
            record.status_code = response.status_code
            if response.status_code != 200:
                record.outcome, record.error = "error", (await response.aread()).decode(errors="replace")[:500]
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    continue
                event = json.loads(payload)
                if "error" in event:
                    record.outcome, record.error = "error", json.dumps(event["error"])[:500]
                    return
                if event.get("content"):
                    if record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - start
                    record.text += event["content"]
                if event.get("stop"):
                    record.end_s = time.perf_counter() - start
                    record.outcome = "delivered"
                    timings = event.get("timings") or {}
                    record.prompt_n, record.cache_n = timings.get("prompt_n"), timings.get("cache_n")
                    record.tokens_evaluated, record.tokens_predicted = event.get("tokens_evaluated"), event.get("tokens_predicted")
        if record.outcome == "pending":
            record.outcome, record.error = "error", "stream ended without a final event"
    except asyncio.CancelledError:
        record.outcome = "superseded"  # leaving `client.stream` closes this unfinished connection
        raise
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.outcome, record.error = "error", f"{type(e).__name__}: {e}"[:500]


async def replay(server: Server, documents: list[Document], args, repeat: int) -> list[Record]:
    records: list[Record] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as client:
        replay_start = time.perf_counter()
        for doc_index, doc in enumerate(documents):
            session = {"X-Ember-Session": f"editor-replay-{repeat}-{doc_index}"} if server.is_ember else {}
            in_flight: asyncio.Task | None = None
            doc_start = time.perf_counter()
            due = 0.0  # the schedule is absolute, so both servers see the same request times
            for index, offset in enumerate(doc.pauses()):
                if index:
                    due += args.typing_s + (args.line_pause_s if doc.region[offset - 1] == "\n" else 0.0)
                await asyncio.sleep(max(0.0, doc_start + due - time.perf_counter()))
                if in_flight is not None and not in_flight.done():
                    in_flight.cancel()  # llama.vim: jobstop() on the running request, then the new one
                    with contextlib.suppress(asyncio.CancelledError):
                        await in_flight
                input_prefix, prompt, input_suffix = doc.context(offset, args.prefix_lines, args.suffix_lines)
                path, body = request_for(server, input_prefix, prompt, input_suffix, args)
                record = Record(server.name, repeat, doc.name, index, offset, time.perf_counter() - replay_start,
                                len(input_prefix) + len(prompt))
                records.append(record)
                in_flight = asyncio.create_task(send(client, server, path, body, session, record))
            if in_flight is not None:
                await in_flight  # the typist stops at the end of the region and reads the last suggestion
            done = [r for r in records if r.document == doc.name]
            print(f"  {server.name} {doc.name}: {len(done)} requests, "
                  f"{sum(r.outcome == 'delivered' for r in done)} delivered, "
                  f"{sum(r.outcome == 'superseded' for r in done)} superseded, "
                  f"{sum(r.outcome == 'error' for r in done)} errors, {time.perf_counter() - doc_start:.1f} s", file=sys.stderr)
    return records


async def warm_up(server: Server, args) -> None:
    path, body = request_for(server, "def add(a, b):\n", "    return", "\n", args)
    body = {**body, "n_predict": 4}
    async with httpx.AsyncClient(timeout=300) as client:
        record = Record(server.name, -1, "warm-up", 0, 0, 0.0, 0)
        await send(client, server, path, body, {}, record)
        if record.outcome != "delivered":
            raise RuntimeError(f"{server.name} warm-up request failed: {record.status_code} {record.error}\n{server.log_tail()}")


# ---- figures ------------------------------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def summarize(records: list[Record], before: dict[str, float], after: dict[str, float], is_ember: bool, wall_s: float) -> dict:
    delivered = [r for r in records if r.outcome == "delivered"]
    ttfts = sorted(r.ttft_s for r in delivered if r.ttft_s is not None)
    any_ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
    computed = sum(r.prompt_n or 0 for r in delivered)
    reused = sum(r.cache_n or 0 for r in delivered)
    delta = {k: after[k] - before[k] for k in after}
    nan = float("nan")
    if is_ember:
        server_reused = delta["prefix_cache_hits"]
        server_computed = delta["prefix_cache_queries"] - delta["prefix_cache_hits"]
    else:
        server_reused, server_computed = delta["prompt_tokens_cached_total"], delta["prompt_tokens_total"]
    return {
        "requests sent": len(records),
        "delivered (got their end)": len(delivered),
        "superseded (cancelled before the end)": sum(r.outcome == "superseded" for r in records),
        "never got a token": sum(r.ttft_s is None for r in records),
        "errors": sum(r.outcome == "error" for r in records),
        "TTFT p50, delivered (ms)": 1e3 * quantile(ttfts, 0.5),
        "TTFT p95, delivered (ms)": 1e3 * quantile(ttfts, 0.95),
        "TTFT p50, any that streamed (ms)": 1e3 * quantile(any_ttfts, 0.5),
        "time to end p50, delivered (ms)": 1e3 * quantile(sorted(r.end_s for r in delivered), 0.5),
        "prompt tokens computed, delivered": computed,
        "prompt tokens reused, delivered": reused,
        "prefix-cache hit rate, delivered": reused / (computed + reused) if computed + reused else nan,
        "prompt tokens computed, server": server_computed,
        "prompt tokens reused, server": server_reused,
        "prefix-cache hit rate, server": server_reused / (server_computed + server_reused) if server_computed + server_reused else nan,
        "typed-ahead reuses, server": delta["completion_typed_ahead_reuses"] if is_ember else 0,
        "superseded, server": delta["completion_superseded"] if is_ember else nan,
        "replay wall time (s)": wall_s,
    }


BETTER = {  # which way is better, for the ratio column
    "delivered (got their end)": "higher", "never got a token": "lower", "errors": "lower",
    "TTFT p50, delivered (ms)": "lower", "TTFT p95, delivered (ms)": "lower", "TTFT p50, any that streamed (ms)": "lower",
    "time to end p50, delivered (ms)": "lower", "prompt tokens computed, delivered": "lower",
    "prefix-cache hit rate, delivered": "higher", "prompt tokens computed, server": "lower",
    "prefix-cache hit rate, server": "higher", "typed-ahead reuses, server": "higher",
}


def fmt(values: list[float], metric: str) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    one = (lambda v: f"{100 * v:.1f}%") if "rate" in metric else (lambda v: f"{v:.2f}") if "(s)" in metric else (lambda v: f"{v:.0f}")
    median = statistics.median(values)
    return one(median) if len(values) == 1 else f"{one(median)} ({one(min(values))}–{one(max(values))})"


def print_table(results: dict[str, list[dict]], names: list[str]) -> None:
    header = ["metric", *names]
    both = "ember" in results and "llama.cpp" in results
    if both:
        header += ["ember / llama.cpp", "better"]
    rows = [header, ["---"] * len(header)]
    for metric in next(iter(results.values()))[0]:
        row = [metric, *(fmt([r[metric] for r in results[name]], metric) for name in names)]
        if both:
            e = statistics.median([r[metric] for r in results["ember"]])
            p = statistics.median([r[metric] for r in results["llama.cpp"]])
            row += [f"{e / p:.2f}x" if p and p == p and e == e else "-", BETTER.get(metric, "")]
        rows.append(row)
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ---- main ---------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["ember", "llama.cpp"], choices=["ember", "llama.cpp"])
    parser.add_argument("--modules", nargs="+", default=None,
                        help=f"standard-library modules to type through (default: {' '.join(DEFAULT_MODULES)})")
    parser.add_argument("--lines", type=int, default=None, help="lines removed and typed back per module (default 8)")
    parser.add_argument("--typing-s", type=float, default=0.25, help="typing time per word, between pauses")
    parser.add_argument("--line-pause-s", type=float, default=1.0, help="extra pause after a newline (reading the suggestion)")
    parser.add_argument("--prefix-lines", type=int, default=256, help="llama.vim's n_prefix")
    parser.add_argument("--suffix-lines", type=int, default=64, help="llama.vim's n_suffix")
    parser.add_argument("--max-prefix-chars", type=int, default=6000, help="0: no cap (llama.vim's window alone)")
    parser.add_argument("--n-predict", type=int, default=32)
    parser.add_argument("--t-max-predict-ms", type=float, default=1000)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, so both servers generate the same text")
    parser.add_argument("--seed", type=int, default=0, help="picks the regions (repeat k uses seed + k)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="replays per server (other regions each); cells become median (min–max)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run: one module, 4 lines")
    parser.add_argument("--dry-run", action="store_true", help="print the replay's schedule and exit, starting no server")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--gguf", default=os.environ.get("SMOLLM2_GGUF"),
                        help="llama.cpp's model (default $SMOLLM2_GGUF, else Ember's embedded file)")
    parser.add_argument("--ember-flags", default="", help="extra `ember serve` flags")
    parser.add_argument("--out", help="write every request's record to this JSON file")
    args = parser.parse_args()
    args.modules = args.modules or (["textwrap"] if args.quick else DEFAULT_MODULES)
    args.lines = args.lines or (4 if args.quick else 8)

    plans = [load_documents(args.modules, args.lines, args.max_prefix_chars, args.seed + k) for k in range(args.repeats)]
    for k, documents in enumerate(plans):
        for doc in documents:
            pauses = doc.pauses()
            typing = (len(pauses) - 1) * args.typing_s + args.line_pause_s * doc.region[:pauses[-1] - 1].count("\n")
            prefix, prompt, _ = doc.context(len(doc.region), args.prefix_lines, args.suffix_lines)
            print(f"repeat {k} {doc.name}: lines {doc.first_line + 1}-{doc.first_line + args.lines}, {len(pauses)} pauses, "
                  f"{typing:.1f} s of typing, prefix from line {doc.prefix_start_line + 1}, "
                  f"last prompt {len(prefix) + len(prompt)} chars",
                  file=sys.stderr)
    if args.dry_run:
        return 0

    servers = []
    if "ember" in args.servers:
        port = free_port()
        servers.append(Server("ember", [sys.executable, "-m", "ember", "serve", "--port", str(port), "--max-model-len", "4096",
                                        "--num-threads", str(args.threads), *args.ember_flags.split()], port))
    if "llama.cpp" in args.servers:
        if not args.llama_server or not os.path.exists(args.llama_server):
            print("llama-server not found: `source ~/.cache/ember-peers/env.sh` (or --llama-server); skipping it", file=sys.stderr)
        else:
            if args.gguf is None:
                from ember.loader.hub import embedded_model_path
                args.gguf = embedded_model_path()
            port = free_port()
            servers.append(Server("llama.cpp", [args.llama_server, "-m", args.gguf, "--port", str(port), "-t", str(args.threads),
                                                "-tb", str(args.threads), "-np", "4", "-c", "16384", "--cache-reuse", "256",
                                                "--metrics"], port))

    results: dict[str, list[dict]] = {}
    all_records: list[Record] = []
    for server in servers:  # one at a time, so they never share the cores
        load = os.getloadavg()[0]
        if load > 0.5:  # llama.cpp's spinning threads suffer most from a busy core: its figures would be the worse hit
            print(f"warning: load average {load:.2f} before starting {server.name}: something else is running, "
                  "timings will not be comparable", file=sys.stderr)
        print(f"{server.name}: starting ({server.url})", file=sys.stderr)
        server.start()
        try:
            asyncio.run(warm_up(server, args))
            for k, documents in enumerate(plans):
                before = server.counters()
                start = time.perf_counter()
                records = asyncio.run(replay(server, documents, args, k))
                wall_s = time.perf_counter() - start
                results.setdefault(server.name, []).append(summarize(records, before, server.counters(), server.is_ember, wall_s))
                all_records += records
        finally:
            server.stop()
            print(f"{server.name}: stopped (log: {server.log.name})", file=sys.stderr)

    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in all_records], f, indent=1)
    if not results:
        return 1
    print(f"\nllama.vim replay: {', '.join(args.modules)}; {args.lines} lines typed back per module; "
          f"{args.typing_s} s per word + {args.line_pause_s} s per newline; n_predict {args.n_predict}, "
          f"t_max_predict_ms {args.t_max_predict_ms:g}, temperature {args.temperature:g}; {args.threads} threads"
          f"{'; ' + str(args.repeats) + ' repeats, median (min–max)' if args.repeats > 1 else ''}\n")
    print_table(results, [s.name for s in servers if s.name in results])
    print("\nratio = Ember / llama.cpp. 'delivered': prompt tokens from each delivered completion's final event "
          "(timings.prompt_n computed, timings.cache_n reused). 'server': /metrics deltas over the replay, superseded "
          "requests included (Ember: prefix_cache_queries - hits / hits; llama.cpp: prompt_tokens_total / "
          "prompt_tokens_cached_total).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
