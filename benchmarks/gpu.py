"""GPU benchmark: Ember vs Hugging Face transformers `generate` on a random-weight model of a real shape.

In one run, on the same weights and prompts: device bandwidth (a large device-to-device copy) and the batch-1
decode roofline it implies (bandwidth / weight bytes read per token); batch-1 decode tokens/s against it; for
each --batches size, output tokens/s (--prompt-len-token prompts, --gen-len new tokens) and TTFT (same prompts,
one token). transformers runs with its static cache and, on CUDA, generate's own `torch.compile` of the
decode step (its docs' recipe). Prints medians of --repeats with min-max, the ratio Ember / transformers and the issue's two targets.
Nothing is downloaded: the model is built with seeded random weights and saved as safetensors in --workdir
(reused when it holds that shape). Not a test: run it with nothing else on the machine.

    .venv/bin/python benchmarks/gpu.py [--shape llama3-8b|smollm2-360m|tiny] [--device cuda] [--repeats 3]
        [--batches 1,8,64,256] [--decode-tokens 256] [--prompt-len 128] [--gen-len 128] [--workdir DIR]
        [--gpu-memory-utilization 0.9] [--kv-cache-memory-gib G] [--quantize none|int8]
        [--hf-compile | --no-hf-compile] [--skip-hf]
    .venv/bin/python benchmarks/gpu.py --device cpu --shape tiny --batches 1,4 --decode-tokens 16 \
        --gen-len 8 --prompt-len 16 --repeats 2        (CPU smoke run)
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import offline  # benchmarks/offline.py, beside this script
from ember import LLM

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False),
}
MARKER = "ember_benchmark_shape.json"
DECODE_PROMPT_LEN = 32
SEED = 0
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype names


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def build_model(shape: str, folder: str, device: str, dtype: torch.dtype) -> None:
    """Seeded random LlamaForCausalLM of `shape` saved as safetensors, plus a word-level tokenizer Ember can read."""
    import tokenizers
    import transformers

    marker = {"shape": shape, "dtype": str(dtype), "seed": SEED}
    marker_path = os.path.join(folder, MARKER)
    if os.path.isfile(marker_path):
        with open(marker_path) as f:
            if json.load(f) == marker:
                log(f"reusing the {shape} model in {folder}")
                return
        for path in [marker_path, *glob.glob(os.path.join(folder, "*.safetensors*"))]:  # an earlier shape's
            os.remove(path)
    elif os.path.isdir(folder) and os.listdir(folder):
        raise SystemExit(f"--workdir {folder} is neither empty nor a folder this benchmark wrote")
    os.makedirs(folder, exist_ok=True)
    log(f"building a random {shape} model ({dtype}) on {device} in {folder} ...")
    s = dict(SHAPES[shape])
    config = transformers.LlamaConfig(
        **{k: v for k, v in s.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]},
        rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None, architectures=["LlamaForCausalLM"])
    torch.manual_seed(SEED)
    with torch.device(device):  # an 8B model is built where it runs, never in host memory first
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():  # small std: logits stay finite through 32 layers in bfloat16
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    del model
    free_memory(device)
    vocab = {f"t{i}": i for i in range(s["vocab_size"])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({}, f)
    with open(marker_path, "w") as f:
        json.dump(marker, f)


def weight_bytes_per_token(folder: str, quantize: str) -> int:
    """Bytes a decode step reads: every layer weight, the final norm and the head (the embedding is one row;
    tied, its matrix is counted once, as the head). int8: every matrix (layers and head) at one byte an element,
    scales ignored."""
    from safetensors import safe_open

    shapes = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                shapes[name] = (t.get_shape(), ITEMSIZE[t.get_dtype()])
    if "lm_head.weight" in shapes:
        shapes.pop("model.embed_tokens.weight")
    total = 0
    for name, (shape, itemsize) in shapes.items():
        if quantize == "int8" and len(shape) == 2:
            itemsize = 1
        total += itemsize * math.prod(shape)
    return total


def measure_bandwidth(device: str, repeats: int) -> list[float]:
    """Device-to-device copy: bytes read + written per second."""
    num_bytes = (2 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copies = 10 if device.startswith("cuda") else 3
    dst.copy_(src)  # warm-up
    results = [2 * num_bytes * copies / timed(lambda: [dst.copy_(src) for _ in range(copies)], device)
               for _ in range(repeats)]
    del src, dst
    free_memory(device)
    return results


def random_prompts(num_prompts: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size, (num_prompts, length), generator=generator).tolist()


class EmberRunner(offline.EmberRunner):  # its generate(); the model is this script's folder
    def __init__(self, folder: str, args, dtype: str):
        options = dict(device=args.device, dtype=dtype, max_model_len=args.max_model_len, max_num_seqs=max(args.batches),
                       max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
                       quantize=args.quantize)  # no prefix caching: the repeats resend the same prompts
        if args.gpu_memory_utilization is not None and args.device.startswith("cuda"):
            options["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.kv_cache_memory_gib is not None:
            options["kv_cache_memory_gib"] = args.kv_cache_memory_gib
        self.llm = LLM(model=folder, progress=False, **options)
        self.label = "ember"



class HFRunner:
    name = "transformers"

    def __init__(self, folder: str, args, dtype: torch.dtype):
        import transformers

        transformers.logging.set_verbosity_error()  # min_new_tokens without an eos id warns on every call
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=args.device).eval()
        self.compiled = args.hf_compile
        if self.compiled:
            # Each batch size compiles its own decode graph: lift dynamo's limit of 8.
            torch._dynamo.config.cache_size_limit = 256
        self.compile_error = None

    @property
    def label(self) -> str:
        return "transformers (static, " + ("eager: compile FAILED" if self.compile_error else
                                           "compiled" if self.compiled else "eager") + ")"

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        ids = torch.tensor(prompts, device=self.model.device)  # equal lengths: no padding needed
        # With the static cache, generate compiles the decode step itself (CUDA graphs, "reduce-overhead") and
        # runs the prefill eagerly: its documented fastest path. Wrapping forward in torch.compile ourselves
        # breaks instead (the static cache's lazily allocated tensors become CUDA-graph outputs).
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, cache_implementation="static",
                      disable_compile=not self.compiled)
        try:
            out = self.model.generate(**kwargs)
        except Exception as error:  # compilation fails inside the first call of a new shape
            if not self.compiled:
                raise
            log(f"  transformers: torch.compile failed, falling back to eager: {type(error).__name__}: {error}")
            self.compiled, self.compile_error = False, f"{type(error).__name__}: {error}"
            torch._dynamo.reset()
            out = self.model.generate(**{**kwargs, "disable_compile": True})
        assert out.shape == (len(prompts), len(prompts[0]) + max_tokens)


def measure(runner, args, vocab_size: int) -> dict[str, list[float]]:
    """Each measurement is first run twice with its exact shapes (compilation, then CUDA graph capture)."""
    results: dict[str, list[float]] = {"decode": [], "decode_ttft": []}
    single = random_prompts(1, DECODE_PROMPT_LEN, vocab_size, seed=1)
    log(f"  {runner.name}: batch-1 decode, {args.decode_tokens} tokens")
    for _ in range(2):
        runner.generate(single, args.decode_tokens)
        runner.generate(single, 1)
    for _ in range(args.repeats):
        t_all = timed(lambda: runner.generate(single, args.decode_tokens), args.device)
        t_first = timed(lambda: runner.generate(single, 1), args.device)
        results["decode"].append((args.decode_tokens - 1) / max(t_all - t_first, 1e-9))
        results["decode_ttft"].append(t_first * 1000)
    log(f"  {runner.name}: batch-1 decode {fmt(results['decode'])} tok/s, TTFT {fmt(results['decode_ttft'])} ms")
    for batch in args.batches:
        log(f"  {runner.name}: batch {batch}, {args.prompt_len} + {args.gen_len} tokens")
        prompts = random_prompts(batch, args.prompt_len, vocab_size, seed=1000 + batch)
        for _ in range(2):
            runner.generate(prompts, args.gen_len)
            runner.generate(prompts, 1)
        results[f"tput{batch}"], results[f"ttft{batch}"] = [], []
        for _ in range(args.repeats):
            seconds = timed(lambda: runner.generate(prompts, args.gen_len), args.device)
            results[f"tput{batch}"].append(batch * args.gen_len / seconds)
            results[f"ttft{batch}"].append(1000 * timed(lambda: runner.generate(prompts, 1), args.device))
        log(f"  {runner.name}: batch {batch} {fmt(results[f'tput{batch}'])} tok/s, TTFT {fmt(results[f'ttft{batch}'])} ms")
    return results


def fmt(values: list[float] | None) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,64,256; 1,4 on cpu)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="new tokens of the batch-1 decode run")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="model folder (default: a temporary one, deleted at exit)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="passed to Ember on cuda only")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None, help="passed to Ember when given")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="Ember's step budget (8192 cuda, 2048 cpu)")
    parser.add_argument("--quantize", default="none", help="Ember's weight quantization (none, int8 on cuda)")
    parser.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="let transformers' generate compile its decode step (default: on for cuda, off for cpu)")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    is_cuda = args.device.startswith("cuda")
    args.batches = [int(b) for b in (args.batches or ("1,8,64,256" if is_cuda else "1,4")).split(",")]
    args.hf_compile = is_cuda if args.hf_compile is None else args.hf_compile
    args.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if is_cuda else 2048)
    args.max_model_len = max(DECODE_PROMPT_LEN + args.decode_tokens, args.prompt_len + args.gen_len)
    dtype_name = "bfloat16" if is_cuda else "float32"
    dtype = getattr(torch, dtype_name)
    device_name = (torch.cuda.get_device_name(args.device) if is_cuda
                   else f"cpu {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    vocab_size = SHAPES[args.shape]["vocab_size"]

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ember-gpu-bench-")
    folder = os.path.abspath(args.workdir or tmp.name)
    build_model(args.shape, folder, args.device, dtype)
    weight_bytes = weight_bytes_per_token(folder, args.quantize)
    log("measuring device bandwidth ...")
    bandwidth = measure_bandwidth(args.device, args.repeats)
    roofline = statistics.median(bandwidth) / weight_bytes

    log("loading ember ...")
    ember = EmberRunner(folder, args, dtype_name)
    rows = {"ember": measure(ember, args, vocab_size)}
    labels = {"ember": ember.label}
    del ember
    free_memory(args.device)
    if not args.skip_hf:
        log("loading transformers ...")
        hf = HFRunner(folder, args, dtype)
        rows["transformers"] = measure(hf, args, vocab_size)
        labels["transformers"] = hf.label
        if hf.compile_error:
            log(f"transformers compile error: {hf.compile_error}")
        del hf
        free_memory(args.device)
    for results in rows.values():
        results["roofline"] = [100 * r / roofline for r in results["decode"]]
    print(f"\n{args.shape} random weights, {dtype_name}, quantize={args.quantize}, on {device_name}")
    print(f"bandwidth {fmt([b / 1e9 for b in bandwidth])} GB/s, weights read per token {weight_bytes / 1e9:.4g} GB, "
          f"roofline {roofline:.1f} tok/s; batches {args.prompt_len}-token prompts + {args.gen_len} new tokens; "
          f"median (min-max) of {args.repeats}\n")
    print_table(rows, labels, args.batches)
    decode = statistics.median(rows["ember"]["decode"])
    print(f"\ntarget batch-1 decode >= 85% of roofline: {decode:.1f} tok/s = {100 * decode / roofline:.1f}% "
          f"-> {'met' if decode >= 0.85 * roofline else 'NOT met'}")
    if "transformers" in rows and 64 in args.batches:
        ratio = statistics.median(rows["ember"]["tput64"]) / statistics.median(rows["transformers"]["tput64"])
        print(f"target batch-64 throughput >= 10x transformers: {ratio:.2f}x -> {'met' if ratio >= 10 else 'NOT met'}")
    else:
        print("target batch-64 throughput >= 10x transformers: not measured (needs 64 in --batches and no --skip-hf)")
    if tmp is not None:
        tmp.cleanup()


def print_table(rows: dict[str, dict[str, list[float]]], labels: dict[str, str], batches: list[int]) -> None:
    table = {"decode": "batch-1 decode (tok/s)", "roofline": "batch-1 decode (% of roofline)",
             "decode_ttft": f"batch-1 TTFT, {DECODE_PROMPT_LEN}-token prompt (ms, lower=better)"}
    for batch in batches:
        table[f"tput{batch}"] = f"batch {batch} throughput (tok/s)"
        table[f"ttft{batch}"] = f"batch {batch} TTFT (ms, lower=better)"
    width = max(24, *(len(labels[n]) for n in rows))
    label_width = max(len(label) for label in table.values())
    header = f"| {'':{label_width}} | " + " | ".join(f"{labels[n]:>{width}}" for n in rows) + " |"
    header += f" {'ratio':>6} |" if "transformers" in rows else ""
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for key, label in table.items():
        line = f"| {label:{label_width}} | " + " | ".join(f"{fmt(rows[n].get(key)):>{width}}" for n in rows) + " |"
        if "transformers" in rows:
            ratio = statistics.median(rows["ember"][key]) / statistics.median(rows["transformers"][key])
            line += f" {ratio:5.2f}x |" if key != "roofline" else f" {'':6} |"
        print(line)


if __name__ == "__main__":
    main()
