"""Tokenize / detokenize, version, OpenAPI docs, and the Prometheus metrics."""
from __future__ import annotations

import httpx

METRICS = [
    "ember:num_requests_running", "ember:num_requests_waiting", "ember:kv_cache_usage_perc",
    "ember:prefix_cache_queries_total", "ember:prefix_cache_hits_total", "ember:num_preemptions_total",
    "ember:prompt_tokens_total", "ember:generation_tokens_total",
    "ember:time_to_first_token_seconds_bucket", "ember:inter_token_latency_seconds_bucket",
    "ember:time_per_output_token_seconds_bucket", "ember:e2e_request_latency_seconds_bucket",
    "ember:request_queue_time_seconds_bucket", "ember:request_success_total",
]


def test_tokenize_detokenize(base_url):
    tokens = httpx.post(base_url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) and tokens["max_model_len"] == 2048
    assert httpx.post(base_url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    chat = httpx.post(base_url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tokens["count"]
    tgi = httpx.post(base_url + "/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["id"] for t in tgi] == tokens["tokens"]
    assert "".join(t["text"] for t in tgi) == "Hello world" and tgi[-1]["stop"] == len("Hello world")
    assert httpx.post(base_url + "/detokenize", json={"tokens": [-1]}).status_code == 400


def test_version_and_docs(base_url):
    assert httpx.get(base_url + "/version").json()["version"]
    assert httpx.get(base_url + "/docs").status_code == 200
    paths = httpx.get(base_url + "/openapi.json").json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream", "/api/chat", "/api/generate", "/metrics"):
        assert path in paths


def _scrape(base_url) -> dict[str, float]:
    samples = {}
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)
    return samples


def _total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


def test_metrics_count_requests(base_url):
    before = _scrape(base_url)
    for name in METRICS:
        assert any(k.split("{")[0] == name for k in before), name
    prompt = "Counting slowly and carefully from one upwards, without skipping any number at all: one, two, three, four, five, six,"
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    usage = httpx.post(base_url + "/v1/completions", json=body, timeout=60).json()["usage"]
    httpx.post(base_url + "/v1/completions", json=body, timeout=60)  # the same prompt again: a prefix-cache hit
    after = _scrape(base_url)
    assert _total(after, "ember:prompt_tokens_total") - _total(before, "ember:prompt_tokens_total") == 2 * usage["prompt_tokens"]
    assert _total(after, "ember:generation_tokens_total") - _total(before, "ember:generation_tokens_total") == 10
    assert _total(after, "ember:time_to_first_token_seconds_count") - _total(before, "ember:time_to_first_token_seconds_count") == 2
    assert _total(after, "ember:e2e_request_latency_seconds_count") - _total(before, "ember:e2e_request_latency_seconds_count") == 2
    assert _total(after, "ember:inter_token_latency_seconds_count") - _total(before, "ember:inter_token_latency_seconds_count") == 8
    length = 'ember:request_success_total{finished_reason="length",model_name="smollm2"}'
    assert after[length] - before.get(length, 0) == 2
    assert _total(after, "ember:prefix_cache_queries_total") > _total(before, "ember:prefix_cache_queries_total")
    assert _total(after, "ember:prefix_cache_hits_total") > _total(before, "ember:prefix_cache_hits_total")
    assert after['ember:num_requests_running{model_name="smollm2"}'] == 0
    assert 0 <= after['ember:kv_cache_usage_perc{model_name="smollm2"}'] <= 1


def test_chat_cli_against_the_server(base_url):
    """`ember chat --url`: streamed answers, history kept across turns, /clear and /exit."""
    from ember.cli import build_parser, run_chat

    args = build_parser().parse_args(["chat", "smollm2", "--url", base_url, "--max-tokens", "5", "--temperature", "0"])
    lines = iter(["Hi!", "And again?", "/clear", "/exit"])
    written: list[str] = []
    assert run_chat(args, read=lambda prompt: next(lines), write=written.append) == 0
    text = "".join(written)
    assert "(history cleared)" in text and "[error" not in text
    answers = text.split("\n")[1:3]
    assert all(answers), text


def test_info_and_metrics_report_the_kernel_variant(base_url):
    """The variant start-up picked for this CPU (the best one built that it runs), in /info and in /metrics."""
    from ember.ops.cpu_kernels import built_variants
    from ember.ops.cpu_variants import best_variant, cpu_flags

    chosen = best_variant(cpu_flags(), built_variants())
    expected = chosen.name if chosen is not None else "reference"
    assert httpx.get(base_url + "/info").json()["kernels"] == expected
    assert _scrape(base_url)[f'ember:kernels_info{{model_name="smollm2",variant="{expected}"}}'] == 1
