"""Tabby wire format: POST /v1/completions with `segments`, answered `{"id", "choices": [{"index", "text"}]}`.

Matched against TabbyML/tabby crates/tabby/src/services/completion.rs (`CompletionRequest`, `Segments`,
`Declaration`, `Snippet`, `DebugOptions`, `CompletionResponse`) and the body tabby-agent builds
(`language`, `segments` {prefix, suffix, filepath, git_url, declarations, relevant_snippets_from_changed_files,
relevant_snippets_from_recently_opened_files, clipboard}, `temperature`, `mode`). Tabby answers in one
piece (no streaming).

Unknown fields are ignored: Tabby's clients send fields of newer server versions. Fields Ember cannot
honour (`mode: next_edit_suggestion`, `debug_options.raw_prompt` / `return_snippets` / `return_prompt`) are a 400.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ember.server.editor import EditorCompletion, FimRequest
from ember.server.serving import InvalidRequestError, Serving, reject_unsupported

# Tabby's CompletionConfig default `max_decoding_tokens`; Tabby's request has no length field.
MAX_DECODING_TOKENS = 64
# Tabby's CodeGenerationOptions default `sampling_temperature`.
DEFAULT_TEMPERATURE = 0.1


class _Lenient(BaseModel):
    # Tabby's clients (tabby-agent and the editor plugins) send fields from newer server versions.
    model_config = ConfigDict(extra="ignore")


class Declaration(_Lenient):
    filepath: str
    body: str


class Snippet(_Lenient):
    filepath: str
    body: str
    score: float = 0.0


class Segments(_Lenient):
    prefix: str
    suffix: str | None = None
    filepath: str | None = None
    git_url: str | None = None  # picks the repository for Tabby's code search; Ember has none
    declarations: list[Declaration] | None = None
    relevant_snippets_from_changed_files: list[Snippet] | None = None
    relevant_snippets_from_recently_opened_files: list[Snippet] | None = None
    clipboard: str | None = None  # a code-search query in Tabby; Ember has no code search
    edit_history: dict | None = None  # only read in next_edit_suggestion mode, which is a 400


class DebugOptions(_Lenient):
    raw_prompt: str | None = None
    return_snippets: bool = False
    return_prompt: bool = False
    disable_retrieval_augmented_code_completion: bool = False  # true: no snippets in the prompt


class TabbyCompletionRequest(_Lenient):
    language: str | None = None  # Tabby's language id; no effect (the editor layer trims by lines/blocks)
    segments: Segments | None = None
    user: str | None = None
    debug_options: DebugOptions | None = None
    temperature: float | None = None
    seed: int | None = None
    mode: str = "standard"

    def to_fim_request(self, session_key: str | None = None) -> FimRequest:
        """`session_key`: the `X-Ember-Session` header if given, else `user`."""
        debug = self.debug_options or DebugOptions()
        reject_unsupported({
            "mode": (self.mode, ("standard",)),
            "debug_options.raw_prompt": (debug.raw_prompt, (None,)),
            "debug_options.return_snippets": (debug.return_snippets, (False,)),
            "debug_options.return_prompt": (debug.return_prompt, (False,)),
        })
        segments = self.segments
        if segments is None:
            raise InvalidRequestError("segments is required", param="segments")  # Tabby's EmptyPrompt
        params = Serving.sampling_params(
            None,
            max_tokens=MAX_DECODING_TOKENS,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            seed=self.seed,
        )
        extra_files = []
        if not debug.disable_retrieval_augmented_code_completion:
            extra_files += [(d.filepath, d.body) for d in segments.declarations or []]
            extra_files += [(s.filepath, s.body) for s in segments.relevant_snippets_from_changed_files or []]
            extra_files += [(s.filepath, s.body) for s in segments.relevant_snippets_from_recently_opened_files or []]
        return FimRequest(
            prefix=segments.prefix,
            suffix=segments.suffix or "",
            params=params,
            extra_files=extra_files,
            filename=segments.filepath,
            session_key=session_key or self.user,
        )


def completion_response(completion: EditorCompletion, response_id: str) -> dict:
    """`response_id`: Tabby's form is `cmpl-<uuid4>`."""
    return {"id": response_id, "choices": [{"index": 0, "text": completion.text}]}
