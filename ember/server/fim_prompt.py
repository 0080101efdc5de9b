"""The prompt of an editor completion: the model's FIM template (or the prefix alone, for a model without
FIM tokens), with the sampling params the template needs, cut to fit the context when it must."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ember.sampling_params import SamplingParams
from ember.server.serving import Serving
from ember.tokenizer import FimTemplate

if TYPE_CHECKING:
    from ember.server.editor import FimRequest


class FimPromptBuilder:
    def __init__(self, serving: Serving, template: FimTemplate | None):
        self.serving = serving
        self.tokenizer = serving.tokenizer
        self.template = template
        self.parse_special = serving.config.parse_special_tokens_in_content

    def build(self, request: FimRequest) -> tuple[list[int], SamplingParams, bool]:
        """The prompt's token ids, the sampling params with the template's stop tokens, and whether the
        context had to be cut to fit (extra files first, then the prefix's oldest lines and the suffix's last)."""
        params = request.params
        if self.template is not None and self.template.stop_token_ids:
            params = dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *sorted(self.template.stop_token_ids)])
        max_tokens = params.max_tokens if params.max_tokens is not None and not request.warm_only else 1
        budget = self.serving.max_model_len - max_tokens
        if budget < 8:
            self.serving.check_context(0, max_tokens, prompt_param="input_prefix")
        prefix, suffix, extra_files, is_truncated = self._drop_what_cannot_fit(request)
        token_ids = self._render(prefix, suffix, extra_files, request.filename)
        while len(token_ids) > budget and extra_files:
            extra_files.pop(0)
            is_truncated = True
            token_ids = self._render(prefix, suffix, extra_files, request.filename)
        if len(token_ids) > budget:
            is_truncated = True
            # template tokens, files (a prefix-only prompt holds no suffix)
            overhead = len(token_ids) - self._num_tokens(prefix) - (self._num_tokens(suffix) if self.template else 0)
            for margin in (0, 16, 64):  # line sizes only add up to about the joined text's
                prefix, suffix = self._fit(prefix, suffix, budget - overhead - margin)
                token_ids = self._render(prefix, suffix, extra_files, request.filename)
                if len(token_ids) <= budget:
                    break
        if not token_ids:
            token_ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 0]
        self.serving.check_context(len(token_ids), max_tokens, prompt_param="input_prefix")
        return token_ids, params, is_truncated

    def _drop_what_cannot_fit(self, request: FimRequest) -> tuple[str, str, list[tuple[str, str]], bool]:
        """The prefix's last lines, the suffix's first lines and the extra files that could fit in the context at
        all (no token is longer than the vocabulary's longest spelling), before any of it is tokenized: an editor
        may send a file of megabytes, and tokenizing all of it would cost seconds for text sure to be cut."""
        limit = self.serving.max_model_len * self.serving.max_token_chars
        prefix, suffix = request.prefix, request.suffix
        if len(prefix) > limit:
            prefix = prefix[prefix.find("\n", len(prefix) - limit) + 1:] if "\n" in prefix[-limit:] else ""
        if len(suffix) > limit:
            suffix = suffix[: suffix.rfind("\n", 0, limit) + 1]
        extra_files = [(name, text) for name, text in request.extra_files if len(name) + len(text) <= limit]
        num_chars = sum(len(name) + len(text) for name, text in extra_files)
        while num_chars > limit:  # build() drops the first files first; these could not all fit
            name, text = extra_files.pop(0)
            num_chars -= len(name) + len(text)
        is_cut = (prefix, suffix, len(extra_files)) != (request.prefix, request.suffix, len(request.extra_files))
        return prefix, suffix, extra_files, is_cut

    def _render(self, prefix: str, suffix: str, extra_files: list[tuple[str, str]], filename: str | None) -> list[int]:
        if self.template is not None:
            return self.template.render(self.tokenizer, prefix, suffix, extra_files, filename, parse_special=self.parse_special)
        # Prefix-only: the extra files go first as context, as comments would in a source file.
        context = "".join(f"\n\n--- {name} ---\n\n{text}" for name, text in extra_files)
        return self.tokenizer.encode(context + prefix, parse_special=self.parse_special) if context + prefix else []

    def _num_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    def _fit(self, prefix: str, suffix: str, budget: int) -> tuple[str, str]:
        """Keeps the prefix's last lines and the suffix's first lines within `budget` tokens, three
        quarters of it for the prefix (llama.cpp's ratio)."""
        budget = max(budget, 0)
        suffix_lines = suffix.splitlines(keepends=True)
        prefix_lines = prefix.splitlines(keepends=True)
        encode = self.tokenizer.backend.encode_batch
        suffix_sizes = [len(e.ids) for e in encode(suffix_lines, add_special_tokens=False)] if suffix_lines else []
        prefix_sizes = [len(e.ids) for e in encode(prefix_lines, add_special_tokens=False)] if prefix_lines else []
        suffix_budget = min(sum(suffix_sizes), budget // 4)
        kept_suffix, used = 0, 0
        while kept_suffix < len(suffix_lines) and used + suffix_sizes[kept_suffix] <= suffix_budget:
            used += suffix_sizes[kept_suffix]
            kept_suffix += 1
        prefix_budget = budget - used
        kept_prefix, used = 0, 0
        while kept_prefix < len(prefix_lines) and used + prefix_sizes[-1 - kept_prefix] <= prefix_budget:
            used += prefix_sizes[-1 - kept_prefix]
            kept_prefix += 1
        return "".join(prefix_lines[len(prefix_lines) - kept_prefix:]), "".join(suffix_lines[:kept_suffix])
