"""The TGI protocol through Hugging Face's `text-generation` client, POST / in both its shapes, /info, /health."""
from __future__ import annotations

import json

import httpx
import pytest
from text_generation import Client
from text_generation.errors import ValidationError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tgi(base_url):
    return Client(base_url, timeout=120)  # posts to POST / (TGI's compatibility route)


def test_generate_with_details(tgi, base_url):
    response = tgi.generate(PROMPT, max_new_tokens=6)
    details = response.details
    assert details.generated_tokens == 6 and details.finish_reason.value == "length"
    assert [t.logprob <= 0 for t in details.tokens] == [True] * 6
    assert "".join(t.text for t in details.tokens) == response.generated_text
    direct = httpx.post(base_url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}, timeout=60).json()
    assert direct == {"generated_text": response.generated_text}


def test_generate_stream_equals_generate(tgi, base_url):
    expected = tgi.generate(PROMPT, max_new_tokens=8).generated_text
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=8))
    assert len(events) == 8  # one event per token
    assert "".join(e.token.text for e in events if not e.token.special) == expected
    assert events[-1].generated_text == expected and events[-1].details.generated_tokens == 8
    assert all(e.generated_text is None for e in events[:-1])
    # The same over /generate_stream, read as raw SSE.
    with httpx.stream("POST", base_url + "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert [json.loads(line[len("data:"):])["index"] for line in lines] == list(range(1, 9))
    last = json.loads(lines[-1][len("data:"):])
    assert last["generated_text"] == expected and last["details"] is None  # details were not asked for


def test_sampling_stop_and_top_tokens(tgi):
    full = tgi.generate(PROMPT, max_new_tokens=10).generated_text
    stop = full.split()[1] if len(full.split()) > 1 else full.split()[0]
    stopped = tgi.generate(PROMPT, max_new_tokens=10, stop_sequences=[stop])
    assert stopped.details.finish_reason.value == "stop_sequence"
    assert stopped.generated_text == full[: full.index(stop)]
    seeded = [tgi.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=3, temperature=0.9).generated_text for _ in range(2)]
    assert seeded[0] == seeded[1]
    top = tgi.generate(PROMPT, max_new_tokens=3, top_n_tokens=2)
    assert len(top.details.top_tokens) == 3 and all(len(t) == 2 for t in top.details.top_tokens)
    full_text = tgi.generate(PROMPT, max_new_tokens=3, return_full_text=True).generated_text
    assert full_text.startswith(PROMPT)


def test_validation_errors_are_422(tgi, base_url):
    with pytest.raises(ValidationError, match="best_of"):
        tgi.generate(PROMPT, max_new_tokens=3, best_of=2, do_sample=True)
    with pytest.raises(ValidationError, match="watermark"):
        tgi.generate(PROMPT, max_new_tokens=3, watermark=True)
    r = httpx.post(base_url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5000}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "2048" in r.json()["error"]
    assert tgi.generate(PROMPT, max_new_tokens=2).generated_text  # still serving


def test_qwen_demo_body(base_url):
    r = httpx.post(base_url + "/", json={"prompt": "Say hello."}, timeout=120)
    body = r.json()
    assert r.status_code == 200 and set(body) == {"response", "status", "time"}
    assert body["status"] == 200 and body["response"]
    r = httpx.post(base_url + "/", json={"text": "neither shape"})
    assert r.status_code == 422 and "inputs" in r.json()["error"]


def test_info_and_health(base_url):
    info = httpx.get(base_url + "/info").json()
    assert info["model_id"] == "smollm2" and info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2047
    assert httpx.get(base_url + "/health").status_code == 200
