"""Structured output: compiles a request's constraint (JSON schema, JSON object, regex, choice, GBNF grammar)
with xgrammar once per distinct constraint, and keeps one grammar matcher per request, advanced token by token.

The engine asks `fill_bitmask` for each constrained request it samples this step; the sampler masks that
request's logits with it (a set bit = an allowed token). xgrammar is imported on first use: it pulls in
transformers, which costs seconds that a server without constrained requests should not pay at start-up.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

from ember.sampling_params import InvalidParameterError, StructuredOutputsParams

_MAX_CACHED_GRAMMARS = 256
# xgrammar prefixes its errors with "[hh:mm:ss] /path/file.cc:line: "; the rest is the message for the user.
_XGRAMMAR_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, num_threads: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width; may exceed the tokenizer's vocabulary
        self.num_threads = num_threads
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles off the engine thread
        self._too_slow: OrderedDict[tuple[str, str], float] = OrderedDict()  # key -> the timeout it missed

    @property
    def bitmask_size(self) -> int:
        return (self.vocab_size + 31) // 32

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar for `params` (cached); InvalidParameterError naming the problem if it cannot compile."""
        key = params.key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
            self._refuse_if_too_slow(key)
            compiler = self._get_compiler()
        try:
            compiled = _compile(compiler, params)
        except RuntimeError as exc:
            message = _XGRAMMAR_ERROR_PREFIX.sub("", str(exc).strip())
            raise InvalidParameterError(f"structured_outputs.{key[0]}", f"cannot be compiled: {message}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def check_not_too_slow(self, params: StructuredOutputsParams) -> None:
        """InvalidParameterError if `params` missed its compile deadline before (and is not cached since)."""
        with self._lock:
            if params.key not in self._cache:
                self._refuse_if_too_slow(params.key)

    def _refuse_if_too_slow(self, key: tuple[str, str]) -> None:
        if key in self._too_slow:
            raise InvalidParameterError(f"structured_outputs.{key[0]}", f"did not compile within "
                                        f"{self._too_slow[key]:g} s when last sent; it is not compiled again")

    def mark_too_slow(self, params: StructuredOutputsParams, timeout: float) -> None:
        """`params` missed its compile deadline: later requests with it are refused at once (unless the
        compile, still running, ends up in the cache)."""
        with self._lock:
            self._too_slow[params.key] = timeout
            while len(self._too_slow) > _MAX_CACHED_GRAMMARS:
                self._too_slow.popitem(last=False)

    def new_matcher(self, params: StructuredOutputsParams) -> "GrammarMatcher":
        import xgrammar

        return GrammarMatcher(xgrammar.GrammarMatcher(self.compile(params)), self.bitmask_size)

    def _get_compiler(self):
        if self._compiler is None:
            import xgrammar

            self._compiler = xgrammar.GrammarCompiler(_tokenizer_info(xgrammar, self.tokenizer, self.vocab_size),
                                                      max_threads=self.num_threads)
        return self._compiler


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, bitmask_size: int):
        self._matcher = matcher
        self.bitmask_size = bitmask_size

    def fill_bitmask(self) -> torch.Tensor:
        """int32 [bitmask_size]: bit t % 32 of word t // 32 is set when token t may come next."""
        bitmask = torch.empty(1, self.bitmask_size, dtype=torch.int32)
        self._matcher.fill_next_token_bitmask(bitmask)
        return bitmask[0]

    def accept(self, token_id: int) -> bool:
        """Advances past `token_id`; False if the grammar does not allow it (the matcher is left unchanged)."""
        return self._matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The structure is complete and a stop token was accepted."""
        return self._matcher.is_terminated()


def _compile(compiler, params: StructuredOutputsParams):
    if params.json is not None:
        # Compact JSON: free whitespace lets a small model loop on newlines until max_tokens.
        return compiler.compile_json_schema(json.dumps(params.json), any_whitespace=False)
    if params.json_object:
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if params.regex is not None:
        return compiler.compile_regex(params.regex)
    if params.choice is not None:
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
    return compiler.compile_grammar(params.grammar)


def _tokenizer_info(xgrammar, tokenizer, vocab_size: int):
    """xgrammar's view of the vocabulary: every token's raw spelling, how spellings encode bytes, the stop tokens."""
    backend = tokenizer.backend
    # Reads the byte encoding (byte-level, byte-fallback, raw) from the tokenizer's JSON, as from_huggingface does.
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    encoded_vocab = [""] * backend.get_vocab_size(with_added_tokens=True)
    for spelling, token_id in backend.get_vocab(with_added_tokens=True).items():
        encoded_vocab[token_id] = spelling
    return xgrammar.TokenizerInfo(
        encoded_vocab,
        metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=sorted(tokenizer.eos_token_ids),
        add_prefix_space=metadata["add_prefix_space"],
    )
