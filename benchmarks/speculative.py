"""Speculative decoding benchmark (issue #8): single-stream tokens/s with and without n-gram prompt lookup.

Two workloads on the embedded model (default engine options, greedy, one request at a time):
  edit  code-editing prompts whose answer restates much of their input (rename, reformat, add a line)
  chat  free chat through the chat template
For each: output tokens/s without speculation, with `--speculative ngram`, and with `--speculative draft`
when --draft-model is given, the ratios, and the acceptance rates (overall and by position). Median of --repeats, min-max shown. Not a test: run it with nothing else on
the machine.

    .venv/bin/python benchmarks/speculative.py [--repeats 3] [--max-tokens 128] [--threads 2] [--k 4]
        [--draft-model PATH]   (a smaller model of the same vocabulary; "embedded" = the embedded model itself,
                                which shows the mechanics' cost, not a real draft's acceptance)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

EDIT_SOURCE = '''def load_config(path):
    with open(path) as f:
        data = json.load(f)
    if "name" not in data:
        raise ValueError("config needs a name")
    data.setdefault("port", 8080)
    data.setdefault("host", "127.0.0.1")
    return data
'''
EDIT_PROMPTS = [
    f"Rename the function load_config to read_config. Answer with the whole code.\n\n```python\n{EDIT_SOURCE}```\n\n```python\n",
    f"Here is a function:\n\n```python\n{EDIT_SOURCE}```\nThe same function with a docstring added:\n\n```python\n",
    f"```python\n{EDIT_SOURCE}```\nCopy the code above, changing 8080 to 9090:\n\n```python\n",
]
CHAT_MESSAGES = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Give me three ideas for a weekend trip.",
]


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def measure(llm, prompts: list[str], max_tokens: int, repeats: int) -> tuple[list[float], dict]:
    """Tokens/s of each repeat (all prompts one after another), and the speculation counters' change."""
    from ember import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    stats = llm.engine.spec_stats
    before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens, list(stats.accepted_per_position))
    speeds = []
    for r in range(repeats):
        num_tokens, elapsed = 0, 0.0
        for prompt in prompts:
            start = time.perf_counter()
            [output] = llm.generate([prompt], params, use_tqdm=False)
            elapsed += time.perf_counter() - start
            num_tokens += len(output.outputs[0].token_ids)
        speeds.append(num_tokens / elapsed)
        log(f"  repeat {r + 1}: {speeds[-1]:.1f} tok/s")
    drafts = stats.num_drafts - before[0]
    counts = {
        "proposed": stats.num_draft_tokens - before[1],
        "accepted": stats.num_accepted_tokens - before[2],
        "per_position": [(a - b) / drafts if drafts else 0.0 for a, b in zip(stats.accepted_per_position, before[3])],
    }
    return speeds, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--draft-model", default=None)
    args = parser.parse_args()

    from ember import LLM
    from ember.loader.hub import embedded_model_path

    draft_model = embedded_model_path() if args.draft_model == "embedded" else args.draft_model
    methods = ["none", "ngram"] + (["draft"] if draft_model else [])
    results = {}
    for method in methods:
        log(f"loading the engine, speculative={method}")
        llm = LLM(progress=False, num_threads=args.threads, speculative=method, num_speculative_tokens=args.k,
                  draft_model=draft_model if method == "draft" else None)
        tokenizer = llm.get_tokenizer()
        chat_prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": m}]), add_special_tokens=False)
                        for m in CHAT_MESSAGES]
        llm.generate(["warm up"], None, use_tqdm=False)
        for workload, prompts in (("edit", EDIT_PROMPTS), ("chat", chat_prompts)):
            log(f"{method} / {workload}")
            results[(workload, method)] = measure(llm, prompts, args.max_tokens, args.repeats)
        del llm

    print(f"\nsingle stream, greedy, {args.max_tokens} new tokens max, {args.threads} threads, k = {args.k}; "
          f"median of {args.repeats} (min-max)\n")
    print(f"{'workload':<8} {'method':<7} {'tok/s':>22} {'ratio':>7} {'accepted':>9}  by position")
    cell = lambda v: f"{statistics.median(v):7.1f} ({min(v):.1f}-{max(v):.1f})"  # noqa: E731
    for workload in ("edit", "chat"):
        base, _ = results[(workload, "none")]
        print(f"{workload:<8} {'none':<7} {cell(base):>22}")
        for method in methods[1:]:
            speeds, counts = results[(workload, method)]
            rate = counts["accepted"] / counts["proposed"] if counts["proposed"] else 0.0
            positions = " ".join(f"{p:.2f}" for p in counts["per_position"])
            print(f"{'':<8} {method:<7} {cell(speeds):>22} {statistics.median(speeds) / statistics.median(base):6.2f}x"
                  f" {rate:8.0%}  {positions}")
    print("\nby position: the fraction of verification steps that accepted the proposal at that position")
    return 0


if __name__ == "__main__":
    sys.exit(main())
