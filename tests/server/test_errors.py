"""Every error case gets its status and the protocol's error shape, and the server keeps serving after it."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from ember.server.protocol import openai as openai_protocol
from ember.server.serving import GenerationError, event_stream, sse

GOOD = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "temperature": 0}

OPENAI_CASES = [
    # (path, body, status, param, message fragment)
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {**GOOD, "temperature": -0.5}, 400, "temperature", "non-negative"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n", "at least 1"),
    ("/v1/completions", {**GOOD, "logprobs": 50}, 400, "logprobs", "[0, 20]"),
    ("/v1/completions", {**GOOD, "guided_decoding_backend": "outlines"}, 400, "guided_decoding_backend", "unsupported field"),
    ("/v1/completions", {**GOOD, "suffix": "}", "n": 2}, 400, "n", "with suffix, n must be 1"),
    ("/v1/completions", {**GOOD, "logit_bias": {"1": 5}}, 400, "logit_bias", "not supported"),
    ("/v1/completions", {**GOOD, "echo": True, "logprobs": 1}, 400, "echo", "logprobs"),
    ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("/v1/completions", {**GOOD, "prompt": [99999999]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {**GOOD, "max_tokens": 2048}, 400, "max_tokens", "2048"),
    ("/v1/completions", {**GOOD, "prompt": "hello " * 2100}, 400, "prompt", "2048"),
    ("/v1/completions", {"model": "smollm2"}, 400, "prompt", "required"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4000}, 400, "max_completion_tokens", "2048"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages.0.role", "Input should be"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "messages", ""),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice", "auto"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None, ""),
]


@pytest.mark.parametrize("path,body,status,param,fragment", OPENAI_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_openai_errors_then_success(base_url, path, body, status, param, fragment):
    r = httpx.post(base_url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    assert fragment in error["message"]
    ok = httpx.post(base_url + "/v1/completions", json=GOOD, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_context_error_states_limit_and_counts(base_url):
    num_prompt = httpx.post(base_url + "/tokenize", json={"prompt": "Hi there"}).json()["count"]
    r = httpx.post(base_url + "/v1/completions", json={**GOOD, "prompt": "Hi there", "max_tokens": 2049 - num_prompt}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in error["message"]
    assert f"you requested 2049 tokens ({num_prompt} in the prompt, {2049 - num_prompt} for the completion)" in error["message"]


def test_malformed_json_and_wrong_types(base_url):
    r = httpx.post(base_url + "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(base_url + "/v1/completions", json={**GOOD, "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert httpx.get(base_url + "/v1/nothing-here").status_code == 404
    assert httpx.post(base_url + "/v1/completions", json=GOOD, timeout=60).status_code == 200


def test_stream_error_before_first_byte_is_a_plain_error(base_url):
    """Bad input on a streamed request is still an HTTP error, not a 200 stream."""
    r = httpx.post(base_url + "/v1/completions", json={**GOOD, "stream": True, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_failure_mid_stream_ends_with_an_error_event():
    """A failure after the first byte ends the stream with the protocol's error event, then [DONE]."""

    async def events():
        yield {"choices": [{"text": "partial"}]}
        raise GenerationError("the engine failed while running this request")

    async def read():
        response = event_stream(events(), sse, openai_protocol.error_body, trailer="data: [DONE]\n\n")
        return [part async for part in response.body_iterator]

    parts = asyncio.run(read())
    assert parts[0].startswith("data: {") and "partial" in parts[0]
    assert '"error":{"message":"the engine failed while running this request","type":"server_error"' in parts[1]
    assert parts[2] == "data: [DONE]\n\n"
