"""Structured output through every protocol against a real server: OpenAI response_format, vLLM's
structured_outputs / guided_*, tool calls (openai SDK), TGI grammar, Ollama format, llama.cpp /completion.

The model runs at a few tokens a second on a shared CPU, so the generating requests are sent at once (one
batch) by the `answers` fixture and each test checks its own answer; errors come back before generating.
"""
from __future__ import annotations

import concurrent.futures
import json
import re

import httpx
import jsonschema
import ollama
import openai
import pytest

from tests.server.conftest import MODEL_NAME

NESTED = {
    "type": "object",
    "properties": {"user": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120}, "admin": {"type": "boolean"}}, "required": ["age", "admin"]}},
    "required": ["user"],
}
ARRAY = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 2}},
    "required": ["tags"],
}
NUMBER = {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["score"]}
ENUM = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["color", "n"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": ENUM}},
]
TOOL_SCHEMAS = {"get_weather": WEATHER, "get_time": ENUM}
PHONE = r"\d{3}-\d{4}"
YES_NO = 'root ::= "yes" | "no"'
MESSAGES = [{"role": "user", "content": "Describe a user as JSON."}]
PLAIN = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(client, **kwargs):
    return client.chat.completions.create(**{"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0, "max_tokens": 40, **kwargs}).choices[0]


def _completion(client, **kwargs):
    return client.completions.create(model=MODEL_NAME, prompt="JSON:", temperature=0, max_tokens=40, **kwargs).choices[0]


def _stream_tool_calls(client, **kwargs) -> tuple[list[dict], str]:
    calls: dict[int, dict] = {}
    finish = None
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=40, stream=True, **kwargs)
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] = call["name"] or (delta.function.name if delta.function else None)
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


def _sse(response: httpx.Response, prefix: str = "data: ") -> list[dict]:
    return [json.loads(line[len(prefix):]) for line in response.text.splitlines() if line.startswith(prefix.strip())]


@pytest.fixture(scope="module")
def answers(client, base_url):
    """Every generating request of this file, sent concurrently, by name."""
    url = base_url
    post = lambda path, body: httpx.post(url + path, json=body, timeout=300)  # noqa: E731
    requests = {
        "response_format": lambda: _chat(client, response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": NESTED, "strict": True}}),
        "json_object": lambda: _chat(client, response_format={"type": "json_object"}),
        "structured_outputs_json": lambda: _completion(client, extra_body={"structured_outputs": {"json": ARRAY}}),
        "guided_json": lambda: _chat(client, extra_body={"guided_json": NUMBER}),
        "guided_regex": lambda: _completion(client, extra_body={"guided_regex": PHONE}),
        "choice": lambda: _chat(client, extra_body={"structured_outputs": {"choice": ["positive", "negative"]}}),
        "guided_grammar": lambda: _completion(client, extra_body={"guided_grammar": YES_NO}),
        "completion_response_format": lambda: _completion(client, extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": ENUM}}}),
        "cut_off": lambda: _chat(client, max_tokens=3, response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": NESTED}}),
        "tools_required": lambda: _chat(client, tools=TOOLS, tool_choice="required"),
        "tools_named": lambda: _chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        "tools_required_stream": lambda: _stream_tool_calls(client, tools=TOOLS, tool_choice="required"),
        "tools_named_stream": lambda: _stream_tool_calls(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}),
        "tools_cut_off": lambda: _chat(client, max_tokens=4, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        "tools_none": lambda: _chat(client, max_tokens=8, tools=TOOLS, tool_choice="none"),
        "tgi_json": lambda: post("/generate", {"inputs": "JSON:", "parameters": {"max_new_tokens": 40, "details": True, "grammar": {"type": "json", "value": json.dumps(ENUM)}}}),
        "tgi_stream_regex": lambda: post("/generate_stream", {"inputs": "Phone:", "parameters": {"max_new_tokens": 20, "grammar": {"type": "regex", "value": PHONE}}}),
        "tgi_compat_schema": lambda: post("/", {"inputs": "JSON:", "parameters": {"max_new_tokens": 40, "grammar": {"type": "json_schema", "value": {"name": "n", "schema": NUMBER}}}}),
        "ollama_chat": lambda: ollama.Client(host=url).chat(model=MODEL_NAME, messages=MESSAGES, format=ARRAY, options={"temperature": 0, "num_predict": 40}),
        "ollama_generate": lambda: post("/api/generate", {"model": MODEL_NAME, "prompt": "Give JSON.", "format": "json", "stream": False, "options": {"temperature": 0, "num_predict": 40}}),
        "llamacpp_grammar": lambda: post("/completion", {"prompt": "Answer:", "n_predict": 20, "temperature": 0, "grammar": YES_NO}),
        "llamacpp_schema_stream": lambda: post("/completion", {"prompt": "JSON:", "n_predict": 40, "temperature": 0, "json_schema": NESTED, "stream": True}),
        "unconstrained": lambda: client.chat.completions.create(**PLAIN).choices[0],
    }
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = {name: pool.submit(fn) for name, fn in requests.items()}
        return {name: future.result() for name, future in futures.items()}


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ---- OpenAI and vLLM --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, schema", [
    ("response_format", NESTED), ("structured_outputs_json", ARRAY), ("guided_json", NUMBER), ("completion_response_format", ENUM),
])
def test_json_schema_outputs_validate(answers, name, schema):
    choice = answers[name]
    assert choice.finish_reason == "stop"
    _valid(choice.message.content if hasattr(choice, "message") else choice.text, schema)


def _json_object(text: str, finish_reason: str) -> None:
    """Any JSON object: it runs on at the model's whim, so a cut-off one is a "length" finish."""
    if finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish_reason == "length" and text.startswith("{")


def test_json_object(answers):
    choice = answers["json_object"]
    _json_object(choice.message.content, choice.finish_reason)


def test_regex_choice_grammar(answers):
    assert re.fullmatch(PHONE, answers["guided_regex"].text)
    assert answers["choice"].message.content in ("positive", "negative")
    assert answers["guided_grammar"].text in ("yes", "no")


def test_cut_off_is_length(answers):
    choice = answers["cut_off"]
    assert choice.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(choice.message.content)


def test_tool_calls(answers):
    for name in ("tools_required", "tools_named"):
        choice = answers[name]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            _valid(call.function.arguments, TOOL_SCHEMAS[call.function.name])
    assert [c.function.name for c in answers["tools_named"].message.tool_calls] == ["get_weather"]


def test_tool_calls_streamed(answers):
    for name, expected in (("tools_required_stream", None), ("tools_named_stream", "get_time")):
        calls, finish = answers[name]
        assert finish == "tool_calls" and calls
        for call in calls:
            assert call["id"].startswith("call_") and (expected is None or call["name"] == expected)
            _valid(call["arguments"], TOOL_SCHEMAS[call["name"]])
    # the stream carries the same calls as the whole answer
    whole = answers["tools_required"].message.tool_calls
    assert [(c["name"], c["arguments"]) for c in answers["tools_required_stream"][0]] == [(c.function.name, c.function.arguments) for c in whole]


def test_tool_call_cut_off_and_none(answers):
    cut = answers["tools_cut_off"]
    assert cut.finish_reason == "length" and cut.message.tool_calls[0].function.name == "get_weather"
    none = answers["tools_none"]
    assert none.message.content and not none.message.tool_calls and none.finish_reason in ("stop", "length")


def test_unconstrained_request_beside_constrained_ones(answers, client):
    """Batch-invariant: the plain request that ran beside all the constrained ones equals it sent alone."""
    alone = client.chat.completions.create(**PLAIN).choices[0]
    assert answers["unconstrained"].message.content == alone.message.content


# ---- TGI, Ollama, llama.cpp ---------------------------------------------------------------------------
def test_tgi_grammar(answers):
    body = answers["tgi_json"].json()
    _valid(body["generated_text"], ENUM)
    assert body["details"]["finish_reason"] == "eos_token"
    events = _sse(answers["tgi_stream_regex"], "data:")
    assert re.fullmatch(PHONE, events[-1]["generated_text"])
    _valid(answers["tgi_compat_schema"].json()[0]["generated_text"], NUMBER)


def test_ollama_format(answers):
    response = answers["ollama_chat"]
    assert response.done_reason == "stop"
    _valid(response.message.content, ARRAY)
    body = answers["ollama_generate"].json()
    _json_object(body["response"], body["done_reason"])


def test_llamacpp_completion(answers):
    body = answers["llamacpp_grammar"].json()
    assert body["content"] in ("yes", "no") and body["stop"] is True and body["stop_type"] == "eos"
    assert body["generation_settings"]["grammar"] == YES_NO
    events = _sse(answers["llamacpp_schema_stream"])
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "eos"
    _valid("".join(e["content"] for e in events), NESTED)


# ---- errors: 400 before generating, in each protocol's shape ----------------------------------------------
BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}
BAD_REGEX = "(ab"
BAD_GRAMMAR = 'root ::= "a'


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}}, "response_format"),
    ({"guided_regex": BAD_REGEX}, "guided_regex"),
    ({"structured_outputs": {"grammar": BAD_GRAMMAR}}, "structured_outputs.grammar"),
    ({"guided_json": NUMBER, "guided_regex": PHONE}, "guided_regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"tools": TOOLS}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_json": NUMBER}, "tools"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_openai_errors(base_url, body, param, stream):
    response = httpx.post(base_url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, "stream": stream, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if param == "tool_choice" and "auto" in json.dumps(body.get("tool_choice", "auto")):
        assert "auto" in error["message"] and "required" in error["message"]


def test_compile_errors_name_the_problem(base_url):
    regex = httpx.post(base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "guided_regex": BAD_REGEX, "stream": True})
    assert regex.status_code == 400 and "guided_regex cannot be compiled" in regex.json()["error"]["message"]
    grammar = httpx.post(base_url + "/completion", json={"prompt": "x", "n_predict": 4, "grammar": BAD_GRAMMAR})
    assert grammar.status_code == 400 and grammar.json()["error"]["message"].startswith("grammar cannot be compiled")
    schema = httpx.post(base_url + "/api/chat", json={"model": MODEL_NAME, "messages": MESSAGES, "format": BAD_SCHEMA})
    assert schema.status_code == 400 and schema.json()["error"].startswith("format cannot be compiled")
    tgi = httpx.post(base_url + "/generate_stream", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": BAD_REGEX}}})
    assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation" and "grammar cannot be compiled" in tgi.json()["error"]
    both = httpx.post(base_url + "/completion", json={"prompt": "x", "grammar": YES_NO, "json_schema": NUMBER})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
    infill = httpx.post(base_url + "/infill", json={"input_prefix": "x", "grammar": YES_NO})
    assert infill.status_code == 400 and infill.json()["error"]["message"].startswith("grammar is not supported")
