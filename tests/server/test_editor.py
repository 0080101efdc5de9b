"""Editor completion end to end on a real server with the embedded model (no FIM tokens: prefix-only):
every wire format, supersede, typed-ahead reuse, deadlines, suffix trimming, priority over chat, metrics."""
from __future__ import annotations

import json
import threading
import time

import httpx
import ollama
import openai
import pytest

from tests.server.conftest import MODEL_NAME, EmberServer

PREFIX = "def bubble_sort(items):\n    "
SESSION = "X-Ember-Session"


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def plain_completion(base_url: str, prompt: str, max_tokens: int) -> str:
    """The greedy continuation without a suffix: what prefix-only FIM generates for this model."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(base_url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]


def infill(base_url: str, session: str | None = None, **body) -> dict:
    headers = {SESSION: session} if session else {}
    response = httpx.post(base_url + "/infill", json={"temperature": 0, **body}, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_say_whether_fim_is_supported(base_url):
    model = httpx.get(base_url + "/v1/models").json()["data"][0]
    assert model["fim"] == {"supported": False, "template": None}  # SmolLM2 has no FIM tokens


def test_infill_as_llama_vim_sends_it(base_url):
    expected = plain_completion(base_url, PREFIX, 12).rstrip()
    body = {
        "input_prefix": "def bubble_sort(items):\n", "prompt": "    ", "input_suffix": "\n", "input_extra": [],
        # llama.vim's sampler chain has no temperature (it samples at 1); top_k 1 makes that greedy here
        "n_predict": 12, "n_indent": 0, "top_k": 1, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 0, "response_fields": [
            "content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n", "tokens_cached", "truncated",
        ],
    }
    response = httpx.post(base_url + "/infill", json=body, timeout=120)
    assert response.headers["X-Ember-FIM-Mode"] == "prefix"  # no FIM tokens: completed from the prefix
    answer = response.json()
    assert answer["content"] == expected
    assert answer["timings/predicted_n"] == 12 and answer["timings/prompt_n"] > 0 and answer["truncated"] is False
    # streamed: token by token, then the final event with stop: true and the timings
    with httpx.stream("POST", base_url + "/infill", json={**body, "stream": True, "response_fields": None}, timeout=120) as r:
        events = sse_events(r)
    assert len(events) > 3 and all(e["stop"] is False for e in events[:-1])
    assert "".join(e["content"] for e in events) == expected
    final = events[-1]
    assert final["stop"] is True and final["stop_type"] == "limit" and final["timings"]["predicted_n"] == 12


def test_infill_warm_up_generates_nothing_and_fills_the_cache(base_url):
    prefix = "import json\nimport os\n\n\ndef load_config(path):\n    " * 4
    warm = infill(base_url, input_prefix=prefix, input_suffix="", n_predict=0)
    assert warm["content"] == "" and warm["tokens_predicted"] == 0 and warm["timings"]["prompt_n"] > 32
    after = infill(base_url, input_prefix=prefix + "with", input_suffix="", n_predict=2)
    assert after["timings"]["cache_n"] >= 32  # the warmed blocks were reused


def test_openai_suffix_through_the_sdk(base_url):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    expected = plain_completion(base_url, PREFIX, 10).rstrip()
    response = client.completions.create(model=MODEL_NAME, prompt=PREFIX, suffix="\n", max_tokens=10, temperature=0)
    assert response.choices[0].text == expected and response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 10
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=PREFIX, suffix="\n", max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10


def test_copilot_engines_route_and_token(base_url):
    assert httpx.get(base_url + "/copilot_internal/v2/token").json() == {"token": "1", "expires_at": 2600000000, "refresh_in": 900}
    expected = plain_completion(base_url, PREFIX, 8).rstrip()
    body = {"prompt": PREFIX, "suffix": "\n", "max_tokens": 8, "temperature": 0, "top_p": 1, "n": 1, "stop": ["\n\n\n"],
            "stream": True, "nwo": "me/repo", "extra": {"language": "python", "next_indent": 4, "prompt_tokens": 9, "suffix_tokens": 1}}
    with httpx.stream("POST", base_url + "/v1/engines/codegen/completions", json=body, timeout=120) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and len(events) > 3
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["object"] == "text_completion" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_mistral_fim_as_continue_sends_it(base_url):
    expected = plain_completion(base_url, PREFIX, 8).rstrip()
    body = {"model": "codestral-latest", "prompt": PREFIX, "suffix": "\n", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", base_url + "/v1/fim/completions", json=body, timeout=120) as r:
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["usage"]["completion_tokens"] == 8
    whole = httpx.post(base_url + "/v1/fim/completions", json={**body, "stream": False}, timeout=120).json()
    assert whole["choices"][0]["message"]["content"] == expected


def test_tabby_segments(base_url):
    body = {"language": "python", "segments": {
        "prefix": PREFIX, "suffix": "\n", "filepath": "sort.py",
        "declarations": [{"filepath": "util.py", "body": "def swap(items, i, j):\n    items[i], items[j] = items[j], items[i]\n"}],
    }, "temperature": 0}
    answer = httpx.post(base_url + "/v1/completions", json=body, timeout=120).json()
    assert answer["id"].startswith("cmpl-") and answer["choices"][0]["index"] == 0
    assert answer["choices"][0]["text"].strip()
    bad = httpx.post(base_url + "/v1/completions", json={"segments": {"suffix": "x"}})
    assert bad.status_code == 400 and "segments.prefix" in bad.json()["error"]["message"]


def test_prefix_only_stops_before_retyping_the_suffix(base_url):
    plain = plain_completion(base_url, PREFIX, 30)
    lines = plain.split("\n")
    assert len(lines) > 3 and lines[2].strip(), plain  # the test needs a continuation of several lines
    suffix = lines[2] + "\n    return items\n"  # the text after the cursor is the continuation's second line
    answer = infill(base_url, input_prefix=PREFIX, input_suffix=suffix, n_predict=30)
    assert answer["content"] == "\n".join(lines[:2]).rstrip()
    assert answer["stop_type"] == "eos"  # a stop of its own, not the length limit


def test_supersede_cancels_the_older_request(server, base_url):
    superseded_before = server.metric("ember:completion_superseded_total")
    body = {"model": MODEL_NAME, "prompt": PREFIX, "suffix": "\n", "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
    events: list = []
    streaming = threading.Event()

    def read_first():
        with httpx.stream("POST", base_url + "/v1/completions", json=body, headers={SESSION: "editor-1"}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    streaming.set()

    reader = threading.Thread(target=read_first)
    reader.start()
    # Its first chunk, not the running-requests gauge (an earlier test's request may still be leaving the
    # engine): the newer request must arrive after the older one is the session's.
    assert streaming.wait(60)
    newer = httpx.post(base_url + "/v1/completions", json={**body, "prompt": "import os\n", "stream": False, "max_tokens": 4},
                       headers={SESSION: "editor-1"}, timeout=120).json()
    reader.join(timeout=60)
    assert newer["choices"][0]["finish_reason"] == "length"
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "cancelled"
    assert server.metric("ember:completion_superseded_total") == superseded_before + 1
    assert server.metric("ember:num_requests_running") == 0  # the older request left the engine
    assert server.metric("ember:kv_cache_usage_perc") == 0  # and its blocks are free


def test_typed_ahead_reuses_the_generation(server, base_url):
    first = infill(base_url, "editor-2", input_prefix=PREFIX, input_suffix="\n", n_predict=24)
    text = first["content"]
    assert len(text) > 12
    prompt_tokens_before = server.metric("ember:prompt_tokens_total")
    reuses_before = server.metric("ember:completion_typed_ahead_reuses_total")
    typed = text[:8]  # the user typed the first characters of the suggestion
    second = infill(base_url, "editor-2", input_prefix=PREFIX + typed, input_suffix="\n", n_predict=24)
    assert second["content"] == text[8:]
    assert second["timings"]["prompt_n"] == 0  # no new prefill
    assert server.metric("ember:prompt_tokens_total") == prompt_tokens_before
    assert server.metric("ember:completion_typed_ahead_reuses_total") == reuses_before + 1
    # Typing something else is a new request.
    third = infill(base_url, "editor-2", input_prefix=PREFIX + "x = ", input_suffix="\n", n_predict=4)
    assert third["timings"]["prompt_n"] > 0


def test_deadline_stops_at_a_line_boundary(base_url):
    free = infill(base_url, input_prefix=PREFIX, input_suffix="", n_predict=40, ignore_eos=True)
    bounded = infill(base_url, input_prefix=PREFIX, input_suffix="", n_predict=40, ignore_eos=True, t_max_predict_ms=100)
    assert free["tokens_predicted"] == 40 and free["stop_type"] == "limit"
    assert bounded["stop_type"] == "limit" and bounded["tokens_predicted"] < 30
    assert free["content"].startswith(bounded["content"] + "\n")  # whole lines of the same text
    assert bounded["content"].strip()


def test_fim_metrics(server):
    assert server.metric("ember:fim_requests_total") > 0
    assert server.metric("ember:completion_time_to_first_token_seconds_count") > 0
    assert server.metric("ember:completion_time_to_first_line_seconds_count") > 0


def test_bad_editor_input_is_a_400(base_url):
    response = httpx.post(base_url + "/infill", json={"input_prefix": "x", "n_predict": -3})
    assert response.status_code == 400 and "n_predict" in response.json()["error"]["message"]
    response = httpx.post(base_url + "/infill", json={"input_prefix": "x", "n_predict": 4, "mirostat": 2})
    assert response.status_code == 400 and "mirostat" in response.json()["error"]["message"]
    response = httpx.post(base_url + "/v1/engines/codegen/completions", json={"prompt": "x", "n": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


# ---- priority: one running slot, taken by a long chat ------------------------------------------
@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory):
    ember = EmberServer("--max-num-seqs", "1", log_path=str(tmp_path_factory.mktemp("editor") / "ember.log"))
    yield ember
    ember.stop()


def test_completion_runs_ahead_of_a_long_chat(one_slot_server):
    url = one_slot_server.url
    chat_body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count to one hundred."}],
                 "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    alone = httpx.post(url + "/v1/chat/completions", json=chat_body, timeout=120).json()["choices"][0]["message"]["content"]
    chat: dict = {}

    def run_chat():
        chat["response"] = httpx.post(url + "/v1/chat/completions", json=chat_body, timeout=180).json()
        chat["end"] = time.monotonic()

    runner = threading.Thread(target=run_chat)
    runner.start()
    deadline = time.monotonic() + 60
    while one_slot_server.metric("ember:generation_tokens_total") < 60 + 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # the chat holds the only slot and is generating
    answer = infill(url, input_prefix=PREFIX, input_suffix="\n", n_predict=4)
    completion_end = time.monotonic()
    runner.join(timeout=180)
    assert answer["tokens_predicted"] == 4
    assert completion_end < chat["end"]  # it did not wait for the chat to finish
    assert one_slot_server.metric("ember:num_preemptions_total") >= 1  # it took the chat's slot
    assert chat["response"]["choices"][0]["message"]["content"] == alone  # and the chat resumed unharmed


def test_ollama_generate_with_suffix(base_url):
    client = ollama.Client(host=base_url)
    expected = plain_completion(base_url, PREFIX, 8).rstrip()
    options = {"temperature": 0, "num_predict": 8}
    whole = client.generate(model=MODEL_NAME, prompt=PREFIX, suffix="\n", options=options)
    assert whole.response == expected and whole.done and whole.eval_count == 8
    parts = list(client.generate(model=MODEL_NAME, prompt=PREFIX, suffix="\n", options=options, stream=True))
    assert "".join(p.response for p in parts) == expected and parts[-1].done
    assert "insert" in client.show(MODEL_NAME).capabilities


def test_over_long_context_is_cut_to_fit(base_url):
    prefix = "".join(f"value_{i} = {i}\n" for i in range(400))  # ~3,000 tokens: beyond the 2,048 context
    suffix = "total = 0\n" * 100
    answer = infill(base_url, input_prefix=prefix, input_suffix=suffix, n_predict=2)
    assert answer["truncated"] is True and answer["tokens_predicted"] == 2
    assert 1000 < answer["tokens_evaluated"] <= 2048 - 2  # the prefix's last lines fill the context
