"""Mistral FIM wire format: POST /v1/fim/completions (Codestral's API), as Continue and other editors send it.

Matched against Mistral's FIM API reference (docs.mistral.ai, `FIMCompletionRequest`: model, prompt,
suffix, temperature, top_p, max_tokens, min_tokens, stream, stop, random_seed, metadata) and against
continuedev/continue core/llm/llms/OpenAI.ts `_streamFim` (which Mistral.ts inherits), whose body also
carries `frequency_penalty` and `presence_penalty` and which reads `choices[0].delta.content` from each
SSE chunk. The answer is chat-completion shaped: `choices[0].message.content`, streamed as
`chat.completion.chunk`s with `choices[0].delta.content`, then `data: [DONE]`.
Unknown fields are a 400, as in protocol/openai.py.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ember.server.editor import EditorCompletion, FimRequest
from ember.server.protocol.openai import usage
from ember.server.serving import Serving

# Mistral's default temperature depends on the model; Codestral's documented recommended range is 0.0-0.7.
DEFAULT_TEMPERATURE = 0.7


class FimCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    suffix: str | None = None
    max_tokens: int | None = None  # null: up to the context length
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    stream: bool = False
    stop: str | list[str] | None = None
    random_seed: int | None = None
    metadata: dict | None = None  # stored with the request by Mistral; no effect
    # Continue's body (OpenAI.ts `_streamFim`) adds these:
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def to_fim_request(self, session_key: str | None = None) -> FimRequest:
        """`session_key`: the `X-Ember-Session` header (Mistral's body has no user field)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = Serving.sampling_params(
            {"seed": "random_seed"},
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens or 0,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            seed=self.random_seed,
            stop=stop,
        )
        return FimRequest(prefix=self.prompt, suffix=self.suffix or "", params=params, session_key=session_key or None)


def fim_response(completion: EditorCompletion, response_id: str, created: int, model: str) -> dict:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.text, "tool_calls": None, "prefix": False},
            "finish_reason": completion.finish_reason,
        }],
        "usage": usage(completion.num_prompt_tokens, completion.num_output_tokens),
    }


def fim_chunk(
    response_id: str, created: int, model: str, delta: str, *, is_first: bool = False,
    completion: EditorCompletion | None = None,
) -> dict:
    """One streamed chunk: the first carries the role; the last (`completion` given, after its iteration
    ended) carries the finish reason and the usage."""
    body = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": {"role": "assistant", "content": delta} if is_first else {"content": delta},
            "finish_reason": completion.finish_reason if completion is not None else None,
        }],
    }
    if completion is not None:
        body["usage"] = usage(completion.num_prompt_tokens, completion.num_output_tokens)
    return body
