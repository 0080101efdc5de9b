"""Render a model's Jinja chat template as Hugging Face transformers does, inside Jinja's sandbox."""
from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def apply_chat_template(
    template: str | None,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra,
) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

    `extra` reaches the template as variables (tools, documents, enable_thinking, ...). There is no
    fallback template: a model without one raises ValueError, because guessing a format the model
    was not trained on gives silently bad answers. A template's raise_exception() raises ValueError.
    """
    if not template:
        raise ValueError("This model has no chat template; use plain completions or supply a chat template")
    tokens = {name: token for name, token in (("bos_token", bos_token), ("eos_token", eos_token)) if token is not None}
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokens, **extra
        )
    except jinja2.TemplateError as exc:
        raise ValueError(f"Chat template error: {exc}") from exc


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &), which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
