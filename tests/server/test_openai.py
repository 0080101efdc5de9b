"""The OpenAI protocol through the official `openai` SDK against a real server."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME

PROMPT = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].object == "model" and models[0].owned_by == "ember"
    assert models[0].model_extra["max_model_len"] == 2048


def test_completion_and_usage(client, base_url):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert response.object == "text_completion" and response.model == MODEL_NAME
    choice = response.choices[0]
    assert choice.text and choice.finish_reason == "length" and choice.index == 0
    num_prompt = httpx.post(base_url + "/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert response.usage.prompt_tokens == num_prompt
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == num_prompt + 8


def test_completion_prompt_forms(client, base_url):
    """A string, a list of strings and token ids give the same greedy text."""
    alone = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    token_ids = httpx.post(base_url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL_NAME, prompt=token_ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == alone
    batch = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "Once upon a time"], max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == alone
    assert batch.usage.completion_tokens == 12


def test_echo(client):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert response.choices[0].text == PROMPT + plain.choices[0].text


def test_chat(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    assert response.object == "chat.completion"
    message = response.choices[0].message
    assert message.role == "assistant" and message.content
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 5
    by_new_name = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    assert by_new_name.choices[0].message.content == message.content


def _timed_stream(stream):
    """(text pieces, arrival times) of a streamed response's content."""
    pieces, times = [], []
    for chunk in stream:
        for choice in chunk.choices:
            text = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            if text:
                pieces.append(text)
                times.append(time.monotonic())
    return pieces, times


def test_completion_stream_equals_non_stream(client):
    expected = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    pieces, times = _timed_stream(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert "".join(pieces) == expected
    assert len(pieces) > 3
    assert times[-1] - times[0] > 0.05  # pieces arrive as tokens are made, not in one burst at the end


def test_chat_stream(client):
    expected = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0).choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 16
    assert all(c.usage is None for c in chunks[:-1])


def test_n2_and_seed(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=1234, logprobs=0)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # seeded: reproducible
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in first.choices)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=1.0, n=2, seed=7)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_stop(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = full.split()
    stop = words[len(words) // 2]
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]


def test_logprobs(client):
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == response.choices[0].text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and len(top) >= 3
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the sampled token is the likeliest

    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].bytes == list(content[0].token.encode())


def test_seed_reproducible_chat(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=42)
    assert client.chat.completions.create(**kwargs).choices[0].message.content == client.chat.completions.create(**kwargs).choices[0].message.content


def test_sixteen_concurrent_streams_match_alone(client):
    prompts = [f"Fact number {i}:" for i in range(16)]

    def stream_text(prompt):
        stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    alone = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream_text, prompts))
    assert together == alone


def test_cancelled_stream_is_aborted(server, client):
    """A client that closes a long stream after a few tokens frees its slot long before the 1000 tokens could
    have been generated (>= 12 s at this model's fastest CPU decode): the bound is generous for a loaded CI
    machine, not a speed claim."""
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1000, temperature=0, stream=True, extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].text)
        if received >= 3:
            break
    assert server.metric("ember:num_requests_running") == 1
    stream.close()
    closed_at = time.monotonic()
    while server.metric("ember:num_requests_running") != 0:
        assert time.monotonic() - closed_at < 5.0, "the cancelled request is still running"
        time.sleep(0.05)
    assert client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_disconnected_non_streamed_request_is_aborted(server, base_url):
    """A client that gives up on a non-streamed request (here: its read timeout) frees its slot too."""
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/completions", json=body, timeout=1.5)
    gave_up_at = time.monotonic()
    while server.metric("ember:num_requests_running") != 0:
        assert time.monotonic() - gave_up_at < 1.0, "the abandoned request is still running"
        time.sleep(0.05)
