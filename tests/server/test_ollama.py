"""The Ollama protocol through the `ollama` Python client."""
from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.server.conftest import MODEL_NAME

GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def client(base_url):
    return ollama.Client(host=base_url, timeout=120)


def test_tags_show_ps_version(client, base_url):
    models = client.list().models
    assert [m.model for m in models] == [MODEL_NAME]
    assert models[0].details.format == "gguf" and models[0].size > 0
    shown = client.show(MODEL_NAME)
    assert shown.modelinfo[f"{shown.details.family}.context_length"] == 2048
    assert "im_start" in shown.template  # the model's chat template
    running = client.ps().models
    assert running[0].model == MODEL_NAME and running[0].context_length == 2048
    assert httpx.get(base_url + "/api/version").json()["version"]


def test_generate(client):
    response = client.generate(model=MODEL_NAME, prompt="Why is the sky blue?", options=GREEDY, stream=False)
    assert response.done and response.done_reason == "length" and response.eval_count == 8
    assert response.response and response.prompt_eval_count > 5 and response.total_duration > 0
    assert len(response.context) == response.prompt_eval_count + 8
    stream = list(client.generate(model=f"{MODEL_NAME}:latest", prompt="Why is the sky blue?", options=GREEDY, stream=True))
    assert len(stream) > 2 and stream[-1].done and not any(part.done for part in stream[:-1])
    assert "".join(part.response for part in stream) == response.response


def test_streams_ndjson_by_default(base_url):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "options": GREEDY}
    with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=60) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) > 2 and lines[-1]["done"] and lines[-1]["eval_count"] == 8


def test_generate_raw_and_context(client, base_url):
    first = client.generate(model=MODEL_NAME, prompt="One, two,", raw=True, options=GREEDY, stream=False)
    assert first.prompt_eval_count == httpx.post(base_url + "/tokenize", json={"prompt": "One, two,"}).json()["count"]
    follow = client.generate(model=MODEL_NAME, prompt="Go on.", context=first.context, options=GREEDY, stream=False)
    assert follow.prompt_eval_count > len(first.context)


def test_chat(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    response = client.chat(model=MODEL_NAME, messages=messages, options=GREEDY, stream=False)
    assert response.message.role == "assistant" and response.message.content and response.done
    parts = list(client.chat(model=MODEL_NAME, messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == response.message.content
    assert parts[-1].done and parts[-1].eval_count == response.eval_count


def test_load_only_requests(client):
    assert client.generate(model=MODEL_NAME).done_reason == "load"
    assert client.chat(model=MODEL_NAME, messages=[]).done_reason == "load"


def test_errors(client, base_url):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3", prompt="hi", stream=False)
    assert err.value.status_code == 404 and "llama3" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=MODEL_NAME, prompt="hi", options={"top_p": 2.0}, stream=False)
    assert err.value.status_code == 400 and "options.top_p" in err.value.error
    bad_format = httpx.post(base_url + "/api/generate", json={"model": MODEL_NAME, "prompt": "hi", "format": "yaml", "stream": False})
    assert bad_format.status_code == 400 and "format" in bad_format.json()["error"]
    # Ollama's documented curl examples post JSON without a JSON content type.
    r = httpx.post(base_url + "/api/generate", content=b'{"model": "smollm2", "prompt": "hi", "stream": false, "options": {"num_predict": 2}}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200 and r.json()["done"]
