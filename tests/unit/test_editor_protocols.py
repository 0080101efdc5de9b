"""Editor wire formats ↔ FimRequest / EditorCompletion: the bodies real clients send, and the answers they parse."""
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from ember.server.editor import FimRequest
from ember.server.protocol import copilot, llamacpp, mistral, openai, tabby
from ember.server.serving import InvalidRequestError, ServingError


@dataclass
class Completion:
    """Stands in for EditorCompletion (its final fields) in these pure translation tests."""

    text: str = "    return a + b\n"
    finish_reason: str | None = "stop"
    num_prompt_tokens: int = 120
    num_cached_tokens: int = 100
    num_output_tokens: int = 8
    fim_mode: str = "fim"
    is_reused: bool = False
    is_truncated: bool = False
    prompt_ms: float = 10.0
    predicted_ms: float = 40.0
    stop_word: str | None = None


def assert_400(call, param: str) -> ServingError:
    with pytest.raises(ServingError) as info:
        call()
    assert info.value.status_code == 400
    assert info.value.param == param
    return info.value


# ---- llama.cpp /infill -------------------------------------------------------------------------
# llama.vim autoload/llama.vim `llama#fim` (default config)
LLAMA_VIM_BODY = {
    "input_prefix": "import os\n\ndef add(a, b):\n",
    "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"text": "def sub(a, b):\n    return a - b\n", "time": [1732280000, 123], "filename": "util.py"}],
    "prompt": "    ",
    "n_predict": 256,
    "n_indent": 4,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 1500,
    "response_fields": [
        "content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms", "timings/prompt_per_second",
        "timings/predicted_n", "timings/predicted_ms", "timings/predicted_per_token_ms", "timings/predicted_per_second",
        "truncated", "tokens_cached",
    ],
}
# llama.vim `s:ring_update`: ship the extra context ahead of the next completion
LLAMA_VIM_WARM_BODY = {
    "input_prefix": "", "input_suffix": "", "prompt": "", "n_predict": 0, "temperature": 0.0, "stream": False,
    "input_extra": [{"text": "x = 1\n", "time": [1, 2], "filename": "a.py"}],
    "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""],
}
# llama.vscode src/llama-server.ts `createRequestPayload(false, ...)` (chunks from extra-context.ts)
LLAMA_VSCODE_BODY = {
    "input_prefix": "function add(a, b) {\n",
    "input_suffix": "\n}\n",
    "input_extra": [{"text": "export const x = 1;\n", "time": 1732280000000, "filename": "src/x.ts"}],
    "prompt": "  ",
    "n_predict": 128,
    "top_k": 40,
    "top_p": 0.99,
    "stream": False,
    "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True,
    "n_indent": 2,
    "t_max_prompt_ms": 500,
    "t_max_predict_ms": 2500,
}


def test_llama_vim_body():
    request = llamacpp.InfillRequest.model_validate(LLAMA_VIM_BODY)
    fim = request.to_fim_request("vim-session-1")
    assert fim.prefix == "import os\n\ndef add(a, b):\n    "
    assert fim.suffix == "\n\nprint(add(1, 2))\n"
    assert fim.extra_files == [("util.py", "def sub(a, b):\n    return a - b\n")]
    assert fim.filename is None
    assert fim.session_key == "vim-session-1"
    assert fim.max_predict_ms == 1500
    assert fim.n_indent == 4
    assert fim.single_line is False and fim.warm_only is False
    p = fim.params
    assert p.max_tokens == 256
    # samplers names top_k and top_p only: no temperature sampler (llama.cpp samples at 1), no min_p
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 40, 0.99, 0.0)
    assert p.seed is None and p.stop == [] and p.repetition_penalty == 1.0


def test_llama_vim_warm_up_body():
    fim = llamacpp.InfillRequest.model_validate(LLAMA_VIM_WARM_BODY).to_fim_request(None)
    assert fim.warm_only is True
    assert fim.prefix == "" and fim.suffix == ""
    assert fim.extra_files == [("a.py", "x = 1\n")]
    assert fim.session_key is None
    assert fim.max_predict_ms == 1


def test_llama_vscode_body():
    fim = llamacpp.InfillRequest.model_validate(LLAMA_VSCODE_BODY).to_fim_request("")
    assert fim.prefix == "function add(a, b) {\n  "
    assert fim.suffix == "\n}\n"
    assert fim.extra_files == [("src/x.ts", "export const x = 1;\n")]
    assert fim.session_key is None  # an empty header is no key
    assert (fim.n_indent, fim.max_predict_ms, fim.params.max_tokens) == (2, 2500, 128)


def test_llamacpp_defaults_and_mapping():
    fim = llamacpp.InfillRequest.model_validate({
        "input_prefix": "a", "n_predict": -1, "seed": 7, "stop": ["\n\n"], "temperature": 0.2, "min_p": 0.1,
        "repeat_penalty": 1.1, "repeat_last_n": -1, "presence_penalty": 0.5, "future_field": {"x": 1},
    }).to_fim_request()
    p = fim.params
    assert p.max_tokens is None  # -1: up to the context
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.2, 40, 0.95, 0.1)  # llama.cpp's defaults fill the rest
    assert (p.seed, p.stop, p.repetition_penalty, p.presence_penalty) == (7, ["\n\n"], 1.1, 0.5)
    assert fim.max_predict_ms is None and fim.n_indent == 0
    # samplers as llama.cpp's one-letter codes
    p = llamacpp.InfillRequest.model_validate({"samplers": "kt", "temperature": 0.0, "top_p": 0.5}).to_fim_request().params
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.0, 40, 1.0, 0.0)


@pytest.mark.parametrize("field, value", [
    ("n_probs", 5), ("mirostat", 2), ("typical_p", 0.9), ("grammar", "root ::= \"a\""), ("return_tokens", True),
    ("lora", [{"id": 0, "scale": 0.5}]), ("n_cmpl", 2), ("xtc_probability", 0.5), ("dry_multiplier", 0.8),
])
def test_llamacpp_unsupported_fields(field, value):
    request = llamacpp.InfillRequest.model_validate({"input_prefix": "a", field: value})
    assert_400(request.to_fim_request, field)


def test_llamacpp_bad_values():
    assert_400(llamacpp.InfillRequest.model_validate({"n_predict": -2}).to_fim_request, "n_predict")
    assert_400(llamacpp.InfillRequest.model_validate({"top_p": 1.5}).to_fim_request, "top_p")
    assert_400(llamacpp.InfillRequest.model_validate({"repeat_penalty": 1.1, "repeat_last_n": 64}).to_fim_request, "repeat_last_n")
    assert_400(llamacpp.InfillRequest.model_validate({"repeat_penalty": -1}).to_fim_request, "repeat_penalty")
    with pytest.raises(ValidationError):
        llamacpp.InfillRequest.model_validate({"n_predict": "many"})


def test_llamacpp_response():
    request = llamacpp.InfillRequest.model_validate({**LLAMA_VSCODE_BODY, "stop": ["\n\n"]})
    fim = request.to_fim_request()
    body = llamacpp.completion_response(Completion(stop_word="\n\n"), request, fim.params, "qwen-coder")
    assert list(body) == [
        "index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
        "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word", "tokens_cached", "timings",
    ]
    assert body["content"] == "    return a + b\n"
    assert (body["index"], body["tokens"], body["id_slot"], body["stop"], body["model"]) == (0, [], 0, True, "qwen-coder")
    assert (body["tokens_predicted"], body["tokens_evaluated"], body["tokens_cached"]) == (8, 120, 128)
    assert (body["has_new_line"], body["truncated"], body["stop_type"], body["stopping_word"]) == (True, False, "word", "\n\n")
    assert body["prompt"] == ""
    assert body["timings"] == {
        "cache_n": 100, "prompt_n": 20, "prompt_ms": 10.0, "prompt_per_token_ms": 0.5, "prompt_per_second": 2000.0,
        "predicted_n": 8, "predicted_ms": 40.0, "predicted_per_token_ms": 5.0, "predicted_per_second": 200.0,
    }
    settings = body["generation_settings"]
    assert (settings["n_predict"], settings["top_k"], settings["top_p"], settings["n_indent"], settings["stop"]) == (128, 40, 0.99, 2, ["\n\n"])
    assert llamacpp.stop_type(Completion(finish_reason="stop")) == "eos"
    assert llamacpp.stop_type(Completion(finish_reason="length")) == "limit"
    assert llamacpp.stop_type(Completion(finish_reason="cancelled")) == "none"


def test_llamacpp_response_fields_as_llama_vim_reads_them():
    request = llamacpp.InfillRequest.model_validate(LLAMA_VIM_BODY)
    body = llamacpp.completion_response(Completion(), request, request.to_fim_request().params, "m")
    assert body == {
        "content": "    return a + b\n",
        "timings/prompt_n": 20, "timings/prompt_ms": 10.0, "timings/prompt_per_token_ms": 0.5, "timings/prompt_per_second": 2000.0,
        "timings/predicted_n": 8, "timings/predicted_ms": 40.0, "timings/predicted_per_token_ms": 5.0,
        "timings/predicted_per_second": 200.0, "truncated": False, "tokens_cached": 128,
    }
    warm = llamacpp.InfillRequest.model_validate(LLAMA_VIM_WARM_BODY)
    empty = Completion(text="", finish_reason="length", num_output_tokens=0, predicted_ms=0.0)
    assert llamacpp.completion_response(empty, warm, warm.to_fim_request().params, "m") == {}  # response_fields [""]


def test_llamacpp_stream_events():
    request = llamacpp.InfillRequest.model_validate({**LLAMA_VSCODE_BODY, "stream": True})
    completion = Completion(num_output_tokens=1)
    assert llamacpp.completion_chunk(completion, "    ") == {
        "index": 0, "content": "    ", "tokens": [], "stop": False, "id_slot": 0, "tokens_predicted": 1, "tokens_evaluated": 120,
    }
    final = llamacpp.completion_response(Completion(), request, request.to_fim_request().params, "m")
    assert final["stop"] is True and final["content"] == "" and final["stop_type"] == "eos"  # the text went out in chunks
    zero = Completion(num_prompt_tokens=5, num_cached_tokens=5, num_output_tokens=0, prompt_ms=0.0, predicted_ms=0.0)
    t = llamacpp.timings(zero)
    assert (t["prompt_n"], t["prompt_per_token_ms"], t["prompt_per_second"], t["predicted_per_second"]) == (0, 0.0, 0.0, 0.0)


def test_llamacpp_error_body():
    err = InvalidRequestError("n_probs is not supported by this server (got 5)", param="n_probs")
    assert llamacpp.error_body(err) == {
        "error": {"code": 400, "message": "n_probs is not supported by this server (got 5)", "type": "invalid_request_error"},
    }


# ---- Tabby ---------------------------------------------------------------------------------------
# tabby-agent's CompletionContext segments + the request built in the VS Code client
TABBY_BODY = {
    "language": "python",
    "segments": {
        "prefix": "def fib(n):\n    ",
        "suffix": "\n        return fib(n - 1) + fib(n - 2)",
        "filepath": "src/fib.py",
        "git_url": "https://github.com/example/repo.git",
        "declarations": [{"filepath": "src/memo.py", "body": "def memo(f):\n    ...\n"}],
        "relevant_snippets_from_changed_files": [{"filepath": "src/a.py", "body": "A = 1\n", "score": 0.9}],
        "relevant_snippets_from_recently_opened_files": [{"filepath": "src/b.py", "body": "B = 2\n", "score": 0.5}],
        "clipboard": "fib(10)",
    },
    "temperature": 0.2,
    "mode": "standard",
    "user": "alice",
    "newer_field": True,
}


def test_tabby_body():
    fim = tabby.TabbyCompletionRequest.model_validate(TABBY_BODY).to_fim_request()
    assert fim.prefix == "def fib(n):\n    "
    assert fim.suffix == "\n        return fib(n - 1) + fib(n - 2)"
    assert fim.filename == "src/fib.py"
    assert fim.extra_files == [("src/memo.py", "def memo(f):\n    ...\n"), ("src/a.py", "A = 1\n"), ("src/b.py", "B = 2\n")]
    assert fim.session_key == "alice"
    assert (fim.params.temperature, fim.params.max_tokens, fim.params.seed) == (0.2, 64, None)
    assert fim.n_indent == 0 and fim.max_predict_ms is None and fim.warm_only is False


def test_tabby_minimal_and_options():
    fim = tabby.TabbyCompletionRequest.model_validate({"segments": {"prefix": "x = "}, "seed": 3}).to_fim_request("hdr")
    assert (fim.prefix, fim.suffix, fim.filename, fim.extra_files, fim.session_key) == ("x = ", "", None, [], "hdr")
    assert (fim.params.temperature, fim.params.seed) == (0.1, 3)
    body = {**TABBY_BODY, "debug_options": {"disable_retrieval_augmented_code_completion": True}}
    assert tabby.TabbyCompletionRequest.model_validate(body).to_fim_request().extra_files == []


def test_tabby_rejects():
    assert_400(tabby.TabbyCompletionRequest.model_validate({"language": "python"}).to_fim_request, "segments")
    assert_400(tabby.TabbyCompletionRequest.model_validate({**TABBY_BODY, "mode": "next_edit_suggestion"}).to_fim_request, "mode")
    body = {**TABBY_BODY, "debug_options": {"raw_prompt": "def f("}}
    assert_400(tabby.TabbyCompletionRequest.model_validate(body).to_fim_request, "debug_options.raw_prompt")
    assert_400(tabby.TabbyCompletionRequest.model_validate({**TABBY_BODY, "temperature": -1}).to_fim_request, "temperature")


def test_tabby_response():
    assert tabby.completion_response(Completion(), "cmpl-1") == {"id": "cmpl-1", "choices": [{"index": 0, "text": "    return a + b\n"}]}


# ---- FauxPilot / Copilot -------------------------------------------------------------------------
# a captured GitHub Copilot ghost-text request (copilot-codex engine)
COPILOT_BODY = {
    "prompt": "# Path: tryit.py\n\n\n\ndef add(x, y):\n    ",
    "suffix": "\n\nprint(add(1, 2))",
    "max_tokens": 500,
    "temperature": 0,
    "top_p": 1,
    "n": 1,
    "stop": ["\n"],
    "nwo": "octo/tryit",
    "stream": True,
    "extra": {"language": "python", "next_indent": 4, "trim_by_indentation": True, "prompt_tokens": 18, "suffix_tokens": 6},
}
# Venthe/vscode-fauxpilot `callOpenAi` through the openai SDK
VSCODE_FAUXPILOT_BODY = {"model": "fastertransformer", "prompt": "def add(x, y):\n", "max_tokens": 80, "temperature": 0.5, "stop": ["\n"]}


def test_copilot_body():
    fim = copilot.CopilotCompletionRequest.model_validate(COPILOT_BODY).to_fim_request()
    assert fim.prefix == "# Path: tryit.py\n\n\n\ndef add(x, y):\n    "
    assert fim.suffix == "\n\nprint(add(1, 2))"
    assert fim.n_indent == 4
    assert fim.session_key is None and fim.extra_files == [] and fim.filename is None
    p = fim.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.n) == (500, 0.0, 1.0, ["\n"], 1)


def test_vscode_fauxpilot_body():
    request = copilot.CopilotCompletionRequest.model_validate(VSCODE_FAUXPILOT_BODY)
    assert request.stream is False
    fim = request.to_fim_request("s1")
    assert (fim.prefix, fim.suffix, fim.n_indent, fim.session_key) == ("def add(x, y):\n", "", 0, "s1")
    assert (fim.params.max_tokens, fim.params.temperature, fim.params.stop) == (80, 0.5, ["\n"])
    fim = copilot.CopilotCompletionRequest.model_validate({**VSCODE_FAUXPILOT_BODY, "user": "bob", "stop": "\n\n"}).to_fim_request()
    assert (fim.session_key, fim.params.stop) == ("bob", ["\n\n"])


def test_copilot_rejects():
    assert_400(copilot.CopilotCompletionRequest.model_validate({**COPILOT_BODY, "n": 3}).to_fim_request, "n")
    assert_400(copilot.CopilotCompletionRequest.model_validate({**COPILOT_BODY, "logprobs": 2}).to_fim_request, "logprobs")
    assert_400(copilot.CopilotCompletionRequest.model_validate({**COPILOT_BODY, "echo": True}).to_fim_request, "echo")
    assert_400(copilot.CopilotCompletionRequest.model_validate({**COPILOT_BODY, "max_tokens": 0}).to_fim_request, "max_tokens")


def test_copilot_token_stub():
    assert copilot.COPILOT_TOKEN == {"token": "1", "expires_at": 2600000000, "refresh_in": 900}


def test_text_completion_response_and_chunks():
    body = openai.fim_completion_response(Completion(stop_word="\n\n"), "cmpl-1", 1700000000, "m")
    assert body == {
        "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "text": "    return a + b\n", "logprobs": None, "finish_reason": "stop", "stop_reason": "\n\n"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128, "prompt_tokens_details": {"cached_tokens": 100}},
        "system_fingerprint": None,
    }
    assert openai.fim_completion_chunk("cmpl-1", 1, "m", "    ") == {
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": "    ", "logprobs": None, "finish_reason": None, "stop_reason": None}],
    }
    last = openai.fim_completion_chunk("cmpl-1", 1, "m", "", "length")
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["text"] == ""
    assert openai.fim_usage_chunk(Completion(), "cmpl-1", 1, "m")["usage"]["total_tokens"] == 128


# ---- OpenAI /v1/completions with suffix -----------------------------------------------------------
def test_openai_suffix_request():
    request = openai.CompletionRequest.model_validate(
        {"model": "m", "prompt": "def f():\n", "suffix": "\nf()\n", "max_tokens": 64, "temperature": 0, "stop": ["\n\n"], "user": "u1"}
    )
    fim = request.fim_request(None)
    assert isinstance(fim, FimRequest)
    assert (fim.prefix, fim.suffix, fim.session_key) == ("def f():\n", "\nf()\n", "u1")
    assert (fim.params.max_tokens, fim.params.temperature, fim.params.stop) == (64, 0.0, ["\n\n"])
    assert request.fim_request(None, "header-key").session_key == "header-key"


def test_openai_suffix_rejects():
    base = {"prompt": "a", "suffix": "b"}
    assert_400(lambda: openai.CompletionRequest.model_validate({**base, "n": 2}).fim_request(None), "n")
    assert_400(lambda: openai.CompletionRequest.model_validate({**base, "prompt": ["a", "b"]}).fim_request(None), "prompt")
    assert_400(lambda: openai.CompletionRequest.model_validate({**base, "prompt": [1, 2]}).fim_request(None), "prompt")
    assert_400(lambda: openai.CompletionRequest.model_validate({**base, "echo": True}).fim_request(None), "echo")
    assert_400(lambda: openai.CompletionRequest.model_validate({**base, "logprobs": 1}).fim_request(None), "logprobs")
    assert_400(lambda: openai.CompletionRequest.model_validate({**base, "temperature": -1}).fim_request(None), "temperature")
    with pytest.raises(ValidationError):  # the OpenAI body stays strict
        openai.CompletionRequest.model_validate({**base, "nwo": "a/b"})


# ---- Mistral / Continue FIM -----------------------------------------------------------------------
# continuedev/continue core/llm/llms/OpenAI.ts `_streamFim` (Mistral.ts inherits it)
CONTINUE_BODY = {
    "model": "codestral-latest",
    "prompt": "def fib(n):\n    ",
    "suffix": "\n\nprint(fib(10))\n",
    "max_tokens": 256,
    "temperature": 0.01,
    "top_p": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "stop": ["\n\n", "\n\n\n"],
    "stream": True,
}


def test_continue_mistral_body():
    request = mistral.FimCompletionRequest.model_validate(CONTINUE_BODY)
    fim = request.to_fim_request("c-1")
    assert (fim.prefix, fim.suffix, fim.session_key) == ("def fib(n):\n    ", "\n\nprint(fib(10))\n", "c-1")
    p = fim.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop) == (256, 0.01, 1.0, ["\n\n", "\n\n\n"])
    fim = mistral.FimCompletionRequest.model_validate(
        {"model": "codestral-latest", "prompt": "x", "min_tokens": 2, "random_seed": 42, "stop": "\n"}
    ).to_fim_request()
    assert (fim.suffix, fim.params.min_tokens, fim.params.seed, fim.params.stop, fim.params.max_tokens) == ("", 2, 42, ["\n"], None)
    assert fim.params.temperature == 0.7


def test_mistral_rejects():
    assert_400(mistral.FimCompletionRequest.model_validate({"prompt": "x", "min_tokens": 5, "max_tokens": 2}).to_fim_request, "min_tokens")
    with pytest.raises(ValidationError):
        mistral.FimCompletionRequest.model_validate({"prompt": "x", "unknown": 1})


def test_mistral_response_and_chunks():
    assert mistral.fim_response(Completion(), "cmpl-1", 5, "codestral") == {
        "id": "cmpl-1", "object": "chat.completion", "created": 5, "model": "codestral",
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "    return a + b\n", "tool_calls": None, "prefix": False},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128},
    }
    first = mistral.fim_chunk("cmpl-1", 5, "codestral", "    ", is_first=True)
    assert first == {
        "id": "cmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "codestral",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "    "}, "finish_reason": None}],
    }
    assert mistral.fim_chunk("cmpl-1", 5, "codestral", "return")["choices"][0]["delta"] == {"content": "return"}
    last = mistral.fim_chunk("cmpl-1", 5, "codestral", "", completion=Completion(finish_reason="length"))
    assert last["choices"][0] == {"index": 0, "delta": {"content": ""}, "finish_reason": "length"}
    assert last["usage"] == {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128}
