"""FauxPilot / GitHub Copilot wire format: POST /v1/engines/{engine}/completions and GET /copilot_internal/v2/token.

The body is OpenAI's completions body (fauxpilot/fauxpilot copilot_proxy/models.py `OpenAIinput`) plus what
Copilot clients add: `nwo` (the repository, "owner/name") and `extra` {language, next_indent,
trim_by_indentation, prompt_tokens, suffix_tokens, force_indent}, as captured Copilot requests show
(e.g. `{"prompt", "suffix", "max_tokens": 500, "temperature": 0, "top_p": 1, "n": 1, "stop": ["\\n"],
"nwo", "stream": true, "extra": {...}}`); Venthe/vscode-fauxpilot sends the plain OpenAI fields through
the `openai` SDK. The answer is OpenAI's `text_completion` (protocol/openai.py's `fim_completion_*`),
streamed as SSE chunks and `data: [DONE]`, as FauxPilot's copilot_proxy/utils/codegen.py answers.
The token stub is FauxPilot's copilot_proxy/app.py `get_copilot_token`, byte for byte.

Unknown fields are ignored, as FauxPilot's pydantic model ignored them: Copilot clients add fields with
new versions. Known fields Ember cannot honour (n > 1, echo, logprobs, best_of > 1, logit_bias) are a 400.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ember.server.editor import FimRequest
from ember.server.serving import InvalidRequestError, Serving, reject_unsupported

# GET /copilot_internal/v2/token: copilot.vim and the Copilot extensions fetch a token before completing.
COPILOT_TOKEN = {"token": "1", "expires_at": 2600000000, "refresh_in": 900}


class _Lenient(BaseModel):
    # Copilot clients send fields from newer versions; FauxPilot ignored unknown fields too.
    model_config = ConfigDict(extra="ignore")


class CopilotExtra(_Lenient):
    language: str | None = None  # the editor's language id: no effect (the editor layer trims by lines/blocks)
    next_indent: int = 0  # indentation of the next non-blank line after the cursor
    trim_by_indentation: bool = False  # end the completion where a line leaves the block
    prompt_tokens: int | None = None  # the client's own token counts: no effect
    suffix_tokens: int | None = None
    force_indent: int | None = None  # newer clients' block indent (-1: none); no effect beyond next_indent


class CopilotCompletionRequest(_Lenient):
    model: str | None = None  # FauxPilot's engine names ("codegen", "fastertransformer"); not checked
    prompt: str = ""
    suffix: str | None = None
    max_tokens: int | None = 16  # OpenAI's default
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    logprobs: int | None = None
    echo: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    logit_bias: dict | None = None
    seed: int | None = None
    user: str | None = None
    nwo: str | None = None  # the GitHub repository, "owner/name": no effect
    extra: CopilotExtra | None = None

    def to_fim_request(self, session_key: str | None = None) -> FimRequest:
        """`session_key`: the `X-Ember-Session` header if given, else `user`."""
        if self.n != 1:
            raise InvalidRequestError(f"n must be 1: this server returns one completion per request (got {self.n})", param="n")
        reject_unsupported({
            "echo": (self.echo, (False,)),
            "logprobs": (self.logprobs, (None,)),
            "best_of": (self.best_of, (None, 1)),
            "logit_bias": (self.logit_bias or None, (None,)),
        })
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = Serving.sampling_params(
            None,
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop,
        )
        extra = self.extra or CopilotExtra()
        return FimRequest(
            prefix=self.prompt,
            suffix=self.suffix or "",
            params=params,
            session_key=session_key or self.user,
            # a line indented less than the code after the cursor leaves its block
            n_indent=max(extra.next_indent, 0) if extra.trim_by_indentation else 0,
        )
