"""OpenAI's function tools: the request models, the JSON schema a `tool_choice` constrains the output to, and
the tool calls read back from that output as it grows.

As vLLM does, `tool_choice: "required"` constrains the output to a JSON array of `{"name", "parameters"}`
(one item per call), and a named function to that function's parameters. The model never writes free text
first, so the calls can be read off the constrained text with no model-specific parser; `"auto"` would need
one (the model decides whether to call), which Ember does not have yet.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ember.server.serving import InvalidRequestError

# A tool without parameters takes an empty object.
NO_PARAMETERS = {"type": "object", "properties": {}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # every constrained call follows its schema exactly anyway


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def tool_schema(tools: list[Tool], tool_choice: ToolChoice | None, parallel_tool_calls: bool | None) -> tuple[dict | None, str | None]:
    """(the JSON schema the output must follow, the forced function's name): (None, None) for plain text."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools to choose from", param="tool_choice")
        return None, None
    if tool_choice is None or tool_choice == "auto":
        raise InvalidRequestError(
            'tool_choice "auto" (the default when tools are given) is not supported yet: this server cannot tell '
            'a tool call from text in free output. Use tool_choice "required", a named function '
            '({"type": "function", "function": {"name": ...}}), or "none"', param="tool_choice",
        )
    if tool_choice == "none":
        return None, None
    by_name = {t.function.name: t.function for t in tools}
    if isinstance(tool_choice, NamedToolChoice):
        function = by_name.get(tool_choice.function.name)
        if function is None:
            raise InvalidRequestError(
                f"tool_choice names the function {tool_choice.function.name!r}, which is not in tools ({', '.join(by_name)})",
                param="tool_choice",
            )
        return function.parameters or NO_PARAMETERS, function.name
    calls = {
        "anyOf": [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [f.name]}, "parameters": f.parameters or NO_PARAMETERS},
            "required": ["name", "parameters"],
        } for f in by_name.values()],
    }
    schema = {"type": "array", "items": calls, "minItems": 1}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema, None


def template_tools(tools: list[Tool] | None) -> dict:
    """The `tools` chat-template variable (Hugging Face's convention), or nothing."""
    return {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}


# One call's opening in the "required" array: `[` or `,` (after the previous call's `}`), then the name.
_CALL_START = re.compile(r'\s*(?:\}\s*)?[\[,]\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*(?=\S)')


class ToolCallReader:
    """Reads tool calls off constrained output as it grows. `feed(delta)` returns OpenAI's streamed
    `tool_calls` delta entries (the first of a call has its id, type and name; the rest extend `arguments`);
    `calls` holds the calls so far, whole, in the shape of a message's `tool_calls`."""

    def __init__(self, function_name: str | None):
        self.function_name = function_name  # a named tool_choice: the whole output is its arguments
        self.calls: list[dict] = []
        self._text = ""
        self._pos = 0  # where the unread text starts
        self._in_arguments = False
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, delta: str) -> list[dict]:
        entries: list[dict] = []
        if self.function_name is not None:
            if not self.calls:
                entries.append(self._start(self.function_name))
            if delta:
                self._extend(entries, delta)
            return entries
        self._text += delta
        while True:
            if not self._in_arguments:
                match = _CALL_START.match(self._text, self._pos)
                if match is None:
                    return entries
                entries.append(self._start(json.loads(match.group(1))))
                self._pos = match.end()
                self._in_arguments, self._depth = True, 0
            end = self._arguments_end()
            if self._pos < end:
                self._extend(entries, self._text[self._pos:end])
            self._pos = end
            if self._in_arguments:  # the arguments go on past what has been generated
                return entries

    def _start(self, name: str) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        return {"index": len(self.calls) - 1, **json.loads(json.dumps(call))}

    def _extend(self, entries: list[dict], text: str) -> None:
        index = len(self.calls) - 1
        self.calls[index]["function"]["arguments"] += text
        if entries and entries[-1]["index"] == index:  # one entry per call in one delta
            entries[-1]["function"]["arguments"] += text
        else:
            entries.append({"index": index, "function": {"arguments": text}})

    def _arguments_end(self) -> int:
        """Scans the arguments value from `_pos`: the index just past its end (leaving the value), or the
        text's end (still inside it)."""
        for i in range(self._pos, len(self._text)):
            ch = self._text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:  # a string value
                        self._in_arguments = False
                        return i + 1
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]" or (ch == "," and self._depth == 0):
                if self._depth == 0:  # a number or literal value, closed by the call's object
                    self._in_arguments = False
                    return i
                self._depth -= 1
                if self._depth == 0:
                    self._in_arguments = False
                    return i + 1
        return len(self._text)
