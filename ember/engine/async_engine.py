"""AsyncEngine: the step loop in the background, an asyncio stream per request, abort on cancel.

The engine steps in a worker thread (torch releases the GIL), while the event loop keeps serving.
Adds and aborts arriving during a step are queued and applied between steps, so the engine's state
is only ever touched by one thread at a time.

`from_config` builds the engine on that same worker thread. OpenMP (libgomp: torch's CPU ops and Ember's
C kernels) keeps a pool of workers for each thread that starts parallel work; once a second pool exists
there are more OpenMP threads than cores, libgomp stops spinning between parallel regions, and every region
then wakes its workers through the kernel. Loading on the main thread and stepping on another made each
CPU step ~1.8x slower (benchmarks/NOTES.md, session 13).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from ember.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-queued-requests; the server answers 503 with Retry-After."""


class RequestAbortedError(RuntimeError):
    """Ends the stream of a request aborted by someone other than its consumer (e.g. a draining server)."""


class EngineDeadError(RuntimeError):
    """A step failed; requests in flight at that moment end with this error."""


class RequestFailedError(RuntimeError):
    """The engine failed on this request alone (the others in its step went on)."""


class StreamStalledError(RequestAbortedError):
    """The consumer stopped reading: more than `max_stream_buffer` outputs waited for it."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None,
                 executor: ThreadPoolExecutor | None = None, max_stream_buffer: int | None = None,
                 grammar_compile_timeout: float | None = None):
        """`executor`: the one-thread executor that steps the engine (the one that built it, see from_config).
        `max_stream_buffer`: outputs a stream may hold unread before its request is aborted.
        `grammar_compile_timeout`: seconds a request waits for its constraint to compile."""
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.max_stream_buffer = max_stream_buffer
        self.grammar_compile_timeout = grammar_compile_timeout
        # One compile at a time, off the event loop: a slow grammar holds one core at most.
        self._compile_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-grammar")
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_adds = []
        self._pending_aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = executor or _step_executor()
        self.is_accepting = True

    @classmethod
    def from_config(cls, config: EngineConfig, **options) -> "AsyncEngine":
        """Loads the engine on the thread that will step it: one OpenMP pool in the process (module docstring).
        `options`: the constructor's keyword arguments."""
        executor = _step_executor()
        try:
            engine = executor.submit(LLMEngine, config).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(engine, executor=executor, **options)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a running slot. A request just added is not waiting while a slot is free
        for it (it is only not scheduled yet), so back-to-back arrivals are not refused by the queue bound."""
        return self._num_waiting_with(0)

    def _num_waiting_with(self, num_new: int) -> int:
        """Requests that would wait for a slot once `num_new` more are added (each sample of n > 1 counts)."""
        queued = len(self.engine.scheduler.waiting) + sum(len(p.sequences) for p in self._pending_adds)
        free_slots = self.engine.config.scheduler.max_num_seqs - len(self.engine.scheduler.running)
        return max(0, queued + num_new - free_slots)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="ember-engine-loop")

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stops accepting; lets in-flight requests finish for up to `drain_timeout`, then aborts the rest."""
        self.is_accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self._streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id, f"the server shut down before this request finished (drain timeout {drain_timeout:g} s)")
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self._executor.shutdown(wait=True)
        self._compile_executor.shutdown(wait=False, cancel_futures=True)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Validates and queues a request, then returns its stream of outputs.

        Raises at once (before any output) for bad input or a full queue. Closing or cancelling the
        stream before it finishes aborts the request.
        """
        if not self.is_accepting:
            raise QueueFullError("the server is shutting down")
        self._check_queue(params.n if params is not None else 1)
        if params is not None and params.structured_outputs is not None:
            await self._compile(params.structured_outputs)
        parent = self.engine.prepare_request(request_id, prompt, params, prompt_token_ids, priority)
        self._check_queue(len(parent.sequences))  # again: others may have queued while this one compiled
        if parent.request_id in self._streams:
            raise ValueError(f"request id {parent.request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[parent.request_id] = queue
        self._pending_adds.append(parent)
        self.start()
        self._wakeup.set()
        return self._stream(parent.request_id, queue)

    def _check_queue(self, num_new: int) -> None:
        """QueueFullError unless `num_new` more requests (n > 1 counts n) fit in the waiting queue."""
        if self.max_queued_requests is not None and self._num_waiting_with(num_new) > self.max_queued_requests:
            raise QueueFullError(f"too many queued requests ({self.num_waiting} waiting, {num_new} more asked, at most "
                                 f"{self.max_queued_requests}); try again shortly")

    async def _compile(self, constraint) -> None:
        """Compiles (or finds cached) a constraint in the one compile thread; prepare_request then finds it in
        the cache. A request that leaves, or waits past the timeout behind other compiles, gives up its place
        in the queue (503 for the latter). A compile that has run past the timeout cannot be interrupted
        (xgrammar has no cancellation): it finishes in the background, and its constraint is remembered as
        too slow (400 now, and at once when sent again)."""
        manager = self.engine.structured_output
        manager.check_not_too_slow(constraint)  # at once, not after waiting behind the compile it missed
        future = self._compile_executor.submit(manager.compile, constraint)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.grammar_compile_timeout)
        except asyncio.TimeoutError:
            if future.cancel():  # it never started: others' compiles held the thread, not this one's cost
                raise QueueFullError("other constraints are compiling; try again shortly") from None
            manager.mark_too_slow(constraint, self.grammar_compile_timeout)
            raise InvalidParameterError(f"structured_outputs.{constraint.key[0]}",
                                        f"did not compile within {self.grammar_compile_timeout:g} s") from None
        except asyncio.CancelledError:
            future.cancel()  # the client left: a compile still queued never runs
            raise

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str, reason: str = "the request was aborted", error: type = RequestAbortedError) -> None:
        """Aborts a request at the next step boundary; its blocks are freed then. A consumer still
        reading the stream gets `error(reason)` rather than waiting forever."""
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(error(reason))
            self._pending_aborts.append(request_id)
            if self._wakeup is not None:
                self._wakeup.set()

    # ---- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as exc:  # a bug or resource failure: fail what is in flight, keep serving
                logger.exception("engine step failed")
                self._fail_all(EngineDeadError(f"the engine failed while running this request: {exc}"))
                continue
            for output in outputs:
                queue = self._streams.get(output.request_id)
                if queue is None:
                    continue
                if output.error is not None:
                    del self._streams[output.request_id]
                    queue.put_nowait(RequestFailedError(f"the engine failed while running this request: {output.error}"))
                    continue
                queue.put_nowait(output)
                if output.finished:
                    del self._streams[output.request_id]
                elif self.max_stream_buffer is not None and queue.qsize() > self.max_stream_buffer:
                    self.abort(output.request_id, f"the client read none of the last {self.max_stream_buffer} outputs",
                               error=StreamStalledError)
            await asyncio.sleep(0)  # let handlers consume outputs and queue new requests

    def _apply_pending(self) -> None:
        adds, self._pending_adds = self._pending_adds, []
        for parent in adds:
            if parent.request_id in self._streams:  # not aborted while pending
                self.engine.add_prepared(parent)
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            self.engine.abort_request(request_id)

    def _fail_all(self, error: Exception) -> None:
        for request_id, queue in list(self._streams.items()):
            queue.put_nowait(error)
            self.engine.abort_request(request_id)
        self._streams.clear()


def _step_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-step")
