"""Editor completion: every editor's wire format ends here as one `FimRequest`.

This layer renders the fill-in-the-middle prompt (or a prefix-only prompt for models without FIM tokens),
supersedes a session's older completion when a newer one arrives, answers typed-ahead requests from the
generation the user is typing through, enforces deadlines, and post-processes the text (line and block
boundaries, the suffix's opening text, trailing whitespace) before any route sees it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ember.sampling_params import SamplingParams
from ember.server.completion_text import CompletionTrimmer
from ember.server.fim_prompt import FimPromptBuilder
from ember.server.serving import TOKENIZE_ON_LOOP_CHARS, InvalidRequestError, RequestStream, Serving, as_serving_error
from ember.tokenizer import detect_fim_template

# Completions run ahead of chat: lower priority values are scheduled first.
COMPLETION_PRIORITY = -1
# An editor that cancels by closing the connection sends its next request right after; the generation
# it dropped is kept this long for that request to reuse (typed ahead) before it is aborted.
ORPHAN_GRACE_S = 2.0
MAX_SESSIONS = 1024


@dataclass
class FimRequest:
    """One editor completion, whatever wire format it came in."""

    prefix: str  # the text before the cursor
    suffix: str = ""  # the text after it
    params: SamplingParams = field(default_factory=SamplingParams)  # max_tokens, temperature, stop, seed, ...
    extra_files: list[tuple[str, str]] = field(default_factory=list)  # (filename, text): repo-level context
    filename: str | None = None  # the file being edited, for repo-level templates
    session_key: str | None = None  # a newer request with the same key supersedes this one
    max_predict_ms: float | None = None  # llama.cpp's t_max_predict_ms: past it (from the first token), stop at a newline
    n_indent: int = 0  # stop before a line indented less than this many columns (llama.cpp's n_indent)
    single_line: bool = False  # stop at the end of the first line that has text
    warm_only: bool = False  # llama.cpp's n_predict 0: compute and cache the prompt, generate nothing




class _Generation:
    """One engine request and what it produced, feeding one editor request at a time (a typed-ahead
    request takes it over from the one it superseded)."""

    def __init__(self, serving: Serving, stream: RequestStream, request: FimRequest):
        self.serving = serving
        self.stream = stream
        self.prefix = request.prefix
        self.suffix = request.suffix
        self.text = ""  # everything generated, before any post-processing
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None  # "stop" | "length" from the engine, "abort" when released
        self.stop_word: str | None = None
        self.error: BaseException | None = None
        self.first_token_time: float | None = None
        self.is_released = False
        self.consumer: EditorCompletion | None = None
        self._waiters: list[asyncio.Future] = []
        self._orphan_timer: asyncio.TimerHandle | None = None
        self.done = asyncio.create_task(self._pump())  # ends when the engine request has ended

    @property
    def is_running(self) -> bool:
        return self.finish_reason is None

    async def _pump(self) -> None:
        try:
            async for output in self.stream:
                if self.is_released:
                    continue
                sample = output.outputs[0]
                self.text = sample.text
                self.num_output_tokens = len(sample.token_ids)
                self.num_cached_tokens = output.num_cached_tokens
                if self.first_token_time is None and sample.token_ids:
                    self.first_token_time = time.monotonic()
                if sample.finished:
                    self.finish_reason = sample.finish_reason
                    self.stop_word = sample.stop_reason if isinstance(sample.stop_reason, str) else None
                self.notify()
        except Exception as exc:  # released (aborted), or the engine failed
            if not self.is_released:
                self.error = exc
        finally:
            if self.finish_reason is None:
                self.finish_reason = "abort"
            self.notify()

    def notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_change(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass

    def release(self, usable_end: int | None = None) -> None:
        """Aborts the engine request (its KV blocks are freed at the next step). Its text, kept for a
        typed-ahead request, ends at `usable_end` (what its reader found complete) or at its last newline."""
        self.cancel_orphan_timer()
        if self.is_running:
            self.serving.engine.abort(self.stream.request_id, "the completion was released")
            self.is_released = True
            self.text = self.text[: self.text.rfind("\n") + 1 if usable_end is None else usable_end]
            self.finish_reason = "stop"
            self.notify()

    def orphan(self) -> None:
        """No request reads it any more: keep it briefly for a typed-ahead request, then release it."""
        self.consumer = None
        if self.is_running and self._orphan_timer is None:
            self._orphan_timer = asyncio.get_running_loop().call_later(ORPHAN_GRACE_S, self._release_if_orphan)

    def _release_if_orphan(self) -> None:
        self._orphan_timer = None
        if self.consumer is None:
            self.release()

    def cancel_orphan_timer(self) -> None:
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None


class EditorCompletion:
    """One editor request's answer. `async for delta in completion` yields post-processed text as it is
    generated; once the iteration ends, the fields below are final. Closing it early (`await aclose()`)
    releases the generation (after a short grace for a typed-ahead request, when it has a session).
    """

    def __init__(self, service: EditorService, request: FimRequest, generation: _Generation, offset: int,
                 num_prompt_tokens: int, is_reused: bool, is_truncated: bool):
        self.text = ""  # everything yielded so far
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" (superseded by a newer request of its session)
        self.num_prompt_tokens = num_prompt_tokens  # the rendered prompt
        self.num_cached_tokens = num_prompt_tokens if is_reused else 0  # prompt tokens not computed for this request
        self.num_output_tokens = 0  # tokens generated for this answer
        self.is_reused = is_reused  # answered from the session's previous generation (the user typed ahead through it)
        self.is_truncated = is_truncated  # the prefix, suffix or extra files were cut to fit the context
        self.prompt_ms = 0.0  # from arrival to the first token
        self.predicted_ms = 0.0  # from the first token to the end
        self.stop_word: str | None = None  # the stop string that ended it, if one did

        self._service = service
        self._request = request
        self._generation = generation
        self._offset = offset  # characters of the generation's text the user already typed
        self._num_tokens_before = generation.num_output_tokens if is_reused else 0
        self._trimmer = CompletionTrimmer(
            request.suffix, request.n_indent, request.single_line, stop_at_suffix_line=service.fim_mode == "prefix"
        )
        self._arrival_time = time.monotonic()
        self._first_delta_time: float | None = None
        self._is_superseded = False
        self._has_first_line = False
        generation.consumer = self

    def __aiter__(self) -> EditorCompletion:
        return self

    async def __anext__(self) -> str:
        while self.finish_reason is None:
            generation = self._generation
            raw = generation.text[self._offset:]
            end, is_complete = self._trimmer.feed(raw, is_final=not generation.is_running)
            reason = None
            if self._is_superseded:
                reason = "cancelled"
            elif is_complete:
                reason = "stop" if generation.is_running else generation.finish_reason
            elif self._past_deadline() and raw[: raw.rfind("\n") + 1].strip():
                end = min(end, len(raw[: raw.rindex("\n")].rstrip()))  # whole lines only
                reason = "length"  # llama.cpp's stop type "limit"
            delta = raw[len(self.text):end] if end > len(self.text) and not self._is_superseded else ""
            if reason is not None:
                self._finish(reason, usable_end=self._offset + end)
            if delta:
                self._on_delta(delta)
                return delta
            if reason is None:
                remaining = self._time_to_deadline()  # past it, only a new line can end it: wait for text
                await generation.wait_change(remaining if remaining else None)
        raise StopAsyncIteration

    def _past_deadline(self) -> bool:
        remaining = self._time_to_deadline()
        return remaining is not None and remaining <= 0

    def _time_to_deadline(self) -> float | None:
        first = self._generation.first_token_time
        if not self._request.max_predict_ms or first is None:
            return None
        start = max(first, self._arrival_time)  # a typed-ahead request's clock starts when it arrives
        return max(0.0, start + self._request.max_predict_ms / 1000 - time.monotonic())

    def _on_delta(self, delta: str) -> None:
        now = time.monotonic()
        self.text += delta
        self.num_output_tokens = max(0, self._generation.num_output_tokens - self._num_tokens_before)
        metrics = self._service.metrics
        if self._first_delta_time is None:
            self._first_delta_time = now
            if metrics is not None:
                metrics.completion_ttft.observe(now - self._arrival_time)
        if not self._has_first_line and self.text.strip() and "\n" in self.text.lstrip():
            self._has_first_line = True
            if metrics is not None:
                metrics.completion_first_line.observe(now - self._arrival_time)

    def _finish(self, reason: str, usable_end: int) -> None:
        generation = self._generation
        if reason == "abort" and generation.error is not None and not self._is_superseded:
            self.finish_reason = "abort"
            raise as_serving_error(generation.error)
        self.finish_reason = "stop" if reason == "abort" else reason
        self.stop_word = generation.stop_word if reason == "stop" and not generation.is_running else None
        self.num_output_tokens = max(0, generation.num_output_tokens - self._num_tokens_before)
        if not self.is_reused:
            self.num_cached_tokens = generation.num_cached_tokens
        now = time.monotonic()
        first = generation.first_token_time or now
        self.prompt_ms = 0.0 if self.is_reused else max(0.0, first - self._arrival_time) * 1000
        self.predicted_ms = (now - max(first, self._arrival_time)) * 1000
        metrics = self._service.metrics
        if not self._has_first_line and metrics is not None:
            self._has_first_line = True
            metrics.completion_first_line.observe(now - self._arrival_time)
        if generation.consumer is self:
            if generation.is_running:
                generation.release(usable_end)  # a line rule or the deadline ended it: stop computing
            generation.consumer = None

    def supersede(self) -> None:
        """A newer request of the same session arrived: end this answer as cancelled."""
        if self.finish_reason is None:
            self._is_superseded = True
            self._generation.notify()

    async def aclose(self) -> None:
        """The reader is gone (its client disconnected) before the answer ended."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            generation = self._generation
            if generation.consumer is self:
                if self._request.session_key is not None:
                    generation.orphan()
                else:
                    generation.consumer = None
                    generation.release()


class EditorService:
    """Turns `FimRequest`s into `EditorCompletion`s: prompt rendering, sessions, supersede and reuse."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.metrics = serving.metrics
        self.tokenizer = serving.tokenizer
        self.template = detect_fim_template(self.tokenizer)
        self.fim_mode = "fim" if self.template is not None else "prefix"
        self._prompts = FimPromptBuilder(serving, self.template)
        self._sessions: OrderedDict[str, _Generation] = OrderedDict()  # the latest generation of each session

    async def complete(self, request: FimRequest) -> EditorCompletion:
        """Starts (or reuses) the generation for `request`; raises a ServingError for bad input."""
        if request.params.n != 1:
            raise InvalidRequestError("editor completions have one choice: n must be 1", param="n")
        if self.metrics is not None:
            self.metrics.fim_requests.labels(self.metrics.model_name, self.fim_mode).inc()
        size = len(request.prefix) + len(request.suffix) + sum(len(text) for _, text in request.extra_files)
        if size > TOKENIZE_ON_LOOP_CHARS:  # tokenizing a large file would hold up every other request
            token_ids, params, is_truncated = await asyncio.to_thread(self._prompts.build, request)
        else:
            token_ids, params, is_truncated = self._prompts.build(request)
        if request.warm_only:
            return await self._warm(request, token_ids, params, is_truncated)

        previous = self._sessions.get(request.session_key) if request.session_key is not None else None
        if previous is not None:
            offset = _typed_ahead(previous, request)
            if previous.consumer is not None:
                previous.consumer.supersede()
                if self.metrics is not None:
                    self.metrics.superseded.inc()
            if offset is not None:
                previous.cancel_orphan_timer()
                if self.metrics is not None:
                    self.metrics.typed_ahead_reuses.inc()
                self._sessions.move_to_end(request.session_key)
                return EditorCompletion(self, request, previous, offset, len(token_ids), True, is_truncated)
            previous.release()

        stream = await self.serving.generate(token_ids, params, priority=COMPLETION_PRIORITY)
        generation = _Generation(self.serving, stream, request)
        if request.session_key is not None:
            self._sessions[request.session_key] = generation
            self._sessions.move_to_end(request.session_key)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)[1].release()
        return EditorCompletion(self, request, generation, 0, len(token_ids), False, is_truncated)

    async def _warm(self, request: FimRequest, token_ids: list[int], params: SamplingParams, is_truncated: bool) -> EditorCompletion:
        """Computes the prompt so its blocks enter the prefix cache; the one sampled token is dropped."""
        arrival_time = time.monotonic()
        stream = await self.serving.generate(token_ids, dataclasses.replace(params, max_tokens=1), priority=COMPLETION_PRIORITY)
        generation = _Generation(self.serving, stream, request)
        await generation.done
        if generation.error is not None:
            raise as_serving_error(generation.error)
        completion = EditorCompletion(self, request, generation, 0, len(token_ids), False, is_truncated)
        completion.num_cached_tokens = generation.num_cached_tokens
        completion.prompt_ms = ((generation.first_token_time or time.monotonic()) - arrival_time) * 1000
        completion.finish_reason = "length"
        generation.consumer = None
        return completion


def _typed_ahead(previous: _Generation, request: FimRequest) -> int | None:
    """How many characters of the previous generation the user typed, when the new request is the old
    one with those characters typed (same suffix) and the generation has more to give; else None."""
    if request.suffix != previous.suffix or not request.prefix.startswith(previous.prefix):
        return None
    typed = request.prefix[len(previous.prefix):]
    if not previous.text.startswith(typed):
        return None
    if previous.error is not None or (not previous.is_running and not previous.text[len(typed):].strip()):
        return None
    return len(typed)
