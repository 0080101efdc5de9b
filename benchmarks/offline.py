"""Offline benchmark: Ember's LLM.generate vs Hugging Face transformers `generate` on the embedded SmolLM2.

Measures, in one run and on the same prompts: single-stream decode tokens/s, prefill tokens/s (512-token
prompt) and total throughput for 32 prompts x 128 new tokens. Prints medians of --repeats runs with
min-max and the ratio Ember / transformers. Not a test: run it with nothing else on the machine.

    .venv/bin/python benchmarks/offline.py [--repeats 3] [--threads 2] [--skip-hf]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from ember import LLM, SamplingParams
from ember.loader.hub import embedded_model_path

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def make_prompt(tokenizer, num_tokens: int, salt: int) -> list[int]:
    text = " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(num_tokens * 2))
    return tokenizer.encode(text)[:num_tokens]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class EmberRunner:
    name = "ember"

    def __init__(self, threads: int):
        self.llm = LLM(progress=False, num_threads=threads, max_model_len=2048, kv_cache_memory_gib=1.0,
                       enable_prefix_caching=False)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)


class HFRunner:
    name = "transformers"

    def __init__(self, threads: int):
        from transformers import AutoModelForCausalLM

        path = embedded_model_path()
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=torch.float32)
        self.model.eval()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        width = max(len(p) for p in prompts)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + max_tokens


def measure(runner, tokenizer, repeats: int) -> dict[str, list[float]]:
    single = [make_prompt(tokenizer, 32, 0)]
    long_prompt = [make_prompt(tokenizer, 512, 1)]
    batch = [make_prompt(tokenizer, 32 + (i % 8) * 8, i) for i in range(32)]
    runner.generate(single, 8)  # warm-up
    results = {"decode": [], "prefill": [], "batch32": []}
    for r in range(repeats):
        print(f"  {runner.name}: repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
        t_first = timed(lambda: runner.generate(single, 1))
        t_all = timed(lambda: runner.generate(single, 129))
        results["decode"].append(128 / max(t_all - t_first, 1e-9))
        results["prefill"].append(512 / timed(lambda: runner.generate(long_prompt, 1)))
        results["batch32"].append(32 * 128 / timed(lambda: runner.generate(batch, 128)))
    return results


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("loading ember ...", file=sys.stderr, flush=True)
    ember = EmberRunner(args.threads)
    tokenizer = ember.tokenizer
    rows = {"ember": measure(ember, tokenizer, args.repeats)}
    del ember
    if not args.skip_hf:
        print("loading transformers ...", file=sys.stderr, flush=True)
        rows["transformers"] = measure(HFRunner(args.threads), tokenizer, args.repeats)

    labels = {"decode": "single-stream decode (tok/s)", "prefill": "prefill, 512-token prompt (tok/s)",
              "batch32": "32 prompts x 128 tokens (tok/s)"}
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF, {args.threads} threads, median (min-max) of {args.repeats}\n")
    header = f"| {'':34} | {'ember':>22} |"
    if "transformers" in rows:
        header += f" {'transformers':>22} | {'ratio':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for key, label in labels.items():
        line = f"| {label:34} | {fmt(rows['ember'][key]):>22} |"
        if "transformers" in rows:
            ratio = statistics.median(rows["ember"][key]) / statistics.median(rows["transformers"][key])
            line += f" {fmt(rows['transformers'][key]):>22} | {ratio:5.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
