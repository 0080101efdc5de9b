"""Each protocol's structured-output fields → the one `StructuredOutputsParams`, and OpenAI tool calls read
off constrained text (no server, no model)."""
from __future__ import annotations

import json

import pytest

from ember.sampling_params import StructuredOutputsParams as S
from ember.server.protocol import llamacpp, ollama, openai, tgi
from ember.server.protocol.openai_tools import ToolCallReader
from ember.server.serving import InvalidRequestError, Serving

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "g"}},
]
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields}).sampling_params(None).structured_outputs


def completion(**fields):
    return openai.CompletionRequest.model_validate({"prompt": "x", **fields}).sampling_params(None).structured_outputs


def assert_400(fn, param: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        fn()
    assert info.value.param == param, info.value.message
    return info.value


@pytest.mark.parametrize("fields, expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, S(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}}, S(json=SCHEMA)),
    ({"structured_outputs": {"json": SCHEMA}}, S(json=SCHEMA)),
    ({"structured_outputs": {"regex": "a+"}}, S(regex="a+")),
    ({"structured_outputs": {"choice": ["x", "y"]}}, S(choice=["x", "y"])),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, S(grammar='root ::= "a"')),
    ({"structured_outputs": {"json_object": True}}, S(json_object=True)),
    ({"guided_json": json.dumps(SCHEMA)}, S(json=SCHEMA)),
    ({"guided_regex": "a+"}, S(regex="a+")),
    ({"guided_choice": ["x"]}, S(choice=["x"])),
    ({"guided_grammar": 'root ::= "a"'}, S(grammar='root ::= "a"')),
])
def test_openai_fields(fields, expected):
    assert chat(**fields) == expected
    assert completion(**fields) == expected


def test_openai_conflicts_and_bad_values():
    assert_400(lambda: chat(guided_json=SCHEMA, guided_regex="a"), "guided_regex")
    assert_400(lambda: chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), "structured_outputs")
    assert_400(lambda: chat(response_format={"type": "json_schema"}), "response_format")
    assert_400(lambda: chat(guided_json="{not json"), "guided_json")
    assert_400(lambda: chat(structured_outputs={}), "structured_outputs")
    assert_400(lambda: chat(guided_choice=[]), "guided_choice")
    assert_400(lambda: openai.CompletionRequest.model_validate({"prompt": "x", "suffix": "y", "guided_regex": "a"}).fim_request(None), "guided_regex")


def test_openai_tools():
    required = chat(tools=TOOLS, tool_choice="required").json
    assert required["type"] == "array" and required["minItems"] == 1 and "maxItems" not in required
    names = [item["properties"]["name"]["enum"] for item in required["items"]["anyOf"]]
    assert names == [["f"], ["g"]]
    assert required["items"]["anyOf"][0]["properties"]["parameters"] == SCHEMA
    assert required["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).json["maxItems"] == 1
    assert chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "f"}}).json == SCHEMA
    assert chat(tools=TOOLS, tool_choice="none") is None
    assert "auto" in assert_400(lambda: chat(tools=TOOLS), "tool_choice").message
    assert_400(lambda: chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "h"}}), "tool_choice")
    assert_400(lambda: chat(tool_choice="required"), "tool_choice")
    request = openai.ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"})
    assert request.template_variables()["tools"][0] == TOOLS[0]
    assert request.param_names["structured_outputs.json"] == "tools"


def test_openai_tool_history_reaches_the_template():
    request = openai.ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]})
    messages = request.template_messages()
    assert messages[1]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_tool_call_reader_streams_what_it_reads_whole():
    text = '[{"name": "f", "parameters": {"a": 1, "s": "x}\\"]"}}, {"name": "g", "parameters": {}}]'
    whole = ToolCallReader(None)
    whole.feed(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole.calls] == [("f", '{"a": 1, "s": "x}\\"]"}'), ("g", "{}")]
    streamed, arguments = ToolCallReader(None), {}
    for ch in text:
        for entry in streamed.feed(ch):
            if "id" in entry:
                assert entry["type"] == "function" and entry["function"]["name"] in ("f", "g")
            arguments[entry["index"]] = arguments.get(entry["index"], "") + entry["function"]["arguments"]
    assert arguments == {0: '{"a": 1, "s": "x}\\"]"}', 1: "{}"}
    named = ToolCallReader("f")
    assert named.feed("")[0]["function"] == {"name": "f", "arguments": ""}
    assert named.feed('{"a"') == [{"index": 0, "function": {"arguments": '{"a"'}}]


@pytest.mark.parametrize("grammar, expected", [
    ({"type": "json", "value": SCHEMA}, S(json=SCHEMA)),
    ({"type": "json", "value": json.dumps(SCHEMA)}, S(json=SCHEMA)),
    ({"type": "json_object", "value": SCHEMA}, S(json=SCHEMA)),
    ({"type": "json_schema", "value": {"name": "n", "schema": SCHEMA}}, S(json=SCHEMA)),
    ({"type": "regex", "value": "a+"}, S(regex="a+")),
])
def test_tgi_grammar(grammar, expected):
    request = tgi.GenerateRequest.model_validate({"inputs": "x", "parameters": {"grammar": grammar}})
    assert request.sampling_params(Serving).structured_outputs == expected


def test_tgi_bad_grammar():
    request = tgi.GenerateRequest.model_validate({"inputs": "x", "parameters": {"grammar": {"type": "json_schema", "value": SCHEMA}}})
    assert_400(lambda: request.sampling_params(Serving), "grammar")


@pytest.mark.parametrize("fmt, expected", [(None, None), ("", None), ("json", S(json_object=True)), (SCHEMA, S(json=SCHEMA))])
def test_ollama_format(fmt, expected):
    for model, body in ((ollama.GenerateRequest, {"prompt": "x"}), (ollama.ChatRequest, {"messages": MESSAGES})):
        request = model.model_validate({"model": "m", "format": fmt, **body})
        assert request.sampling_params(Serving).structured_outputs == expected
    assert_400(lambda: ollama.ChatRequest.model_validate({"model": "m", "format": "yaml"}).sampling_params(Serving), "format")
    assert_400(ollama.GenerateRequest.model_validate({"model": "m", "format": "json", "suffix": "y"}).check, "format")


def test_llamacpp_completion_request():
    def params(**fields):
        return llamacpp.CompletionRequest.model_validate({"prompt": "x", **fields}).sampling_params()

    assert params(grammar='root ::= "a"').structured_outputs == S(grammar='root ::= "a"')
    assert params(json_schema=SCHEMA).structured_outputs == S(json=SCHEMA)
    assert params(grammar="").structured_outputs is None
    p = params(n_predict=5, temperature=0, top_k=1, seed=3, stop=["\n"])
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop) == (5, 0.0, 1, 3, ["\n"])
    assert llamacpp.CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert_400(lambda: params(grammar='root ::= "a"', json_schema=SCHEMA), "grammar")
    assert_400(lambda: params(n_indent=2), "n_indent")
    assert_400(llamacpp.InfillRequest.model_validate({"json_schema": SCHEMA}).to_fim_request, "json_schema")
