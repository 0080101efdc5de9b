"""Continuous batching with one rule: each step, every request's computed tokens catch up with its tokens.

There is no prefill phase and decode phase. A request has `num_tokens` (prompt + output) and
`num_computed_tokens`; a step schedules up to `num_tokens - num_computed_tokens` of them within the
token budget. A long prompt is thereby chunked, a prefix-cache hit starts it further along, and a
decode is the case of one token, and speculative decoding the case of one token plus the proposed ones
(`spec_token_ids`, counted after `num_tokens` until verified). When blocks run out, the newest running request is preempted
(its blocks freed, recomputed later). No torch here.
"""
from __future__ import annotations

import bisect
import time

from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.request import Request, RequestStatus
from ember.engine.scheduler_output import ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []  # in scheduling order; the last is preempted first
        self.requests: dict[str, Request] = {}
        self.finished_request_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        keys = [r.sort_key() for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, request.sort_key()), request)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Ends a request (stopped, length or aborted) at any point and frees its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        # A failed step may have left its K/V unwritten: none of it may be matched as a cached prefix.
        self.kv_cache.free(request, keep_cached=status != RequestStatus.FINISHED_ERROR)
        self.finished_request_ids.add(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []

        # Running requests in order (sorted by priority), preempting from the back when blocks run out.
        # A waiting request of strictly better priority goes before the running ones it outranks, and
        # may preempt them for a slot or for blocks: a long chat cannot stall an editor's completion.
        i = 0
        while budget > 0:
            request = self.running[i] if i < len(self.running) else None
            head = self.waiting[0] if self.waiting else None
            if head is not None and (request is None or head.priority < request.priority):
                if request is None and preempted:
                    break  # this step had to preempt: no room to spare for equal or lower priorities
                num_new = self._admit(head, budget, i, preempted)
                if num_new == 0:
                    if request is None:
                        break
                    head = None
                else:
                    scheduled.append((head, num_new))
                    budget -= num_new
                    i += 1
                    continue
            if request is None:
                break
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1

        output = SchedulerOutput(
            requests=[self._scheduled(request, num_new) for request, num_new in scheduled],
            finished_request_ids=self.finished_request_ids,
            preempted_request_ids=[r.request_id for r in preempted],
        )
        self.finished_request_ids = set()
        return output

    def _admit(self, request: Request, budget: int, position: int, preempted: list[Request]) -> int:
        """Moves the head of the waiting queue into `running[position]` with its first tokens scheduled,
        preempting running requests of worse priority if it needs their slot or blocks. Returns how many
        tokens were scheduled (0: it stays waiting)."""
        while len(self.running) >= self.config.max_num_seqs:
            if not self._preempt_worse_than(request, preempted):
                return 0
        while True:
            computed_block_ids, num_cached = [], 0
            if request.num_computed_tokens == 0:
                computed_block_ids, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, budget, num_computed=num_cached)
            if num_new == 0:
                return 0
            if self.kv_cache.allocate_slots(request, num_new, computed_block_ids):
                break
            if not self._preempt_worse_than(request, preempted):
                return 0
        self.kv_cache.record_prefix_lookup(request.num_tokens, num_cached)
        self.waiting.pop(0)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_cached
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_cached
            request.scheduled_time = time.monotonic()
        self.running.insert(min(position, len(self.running)), request)
        return num_new

    def _preempt_worse_than(self, request: Request, preempted: list[Request]) -> bool:
        if not self.running or self.running[-1].priority <= request.priority:
            return False
        victim = self.running.pop()
        self._preempt(victim)
        preempted.append(victim)
        return True

    def _num_new_tokens(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        num_computed = request.num_computed_tokens if num_computed is None else num_computed
        num_new = request.num_tokens + len(request.spec_token_ids) - num_computed
        if num_new > budget:
            # Without chunked prefill a prompt runs whole or waits for a step with room for it.
            num_new = budget if self.config.enable_chunked_prefill else 0
        return num_new

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new
        # A budget that cuts into the proposals drops the rest of them.
        num_spec = max(0, end - request.num_tokens)
        request.spec_token_ids = request.spec_token_ids[:num_spec]
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start:end] + request.spec_token_ids,
            start_position=start,
            block_ids=list(self.kv_cache.block_ids(request.request_id)),
            do_sample=end >= request.num_tokens,
            params=request.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            num_spec_tokens=num_spec,
        )

    def update_from_output(self, output: SchedulerOutput, num_rejected: dict[str, int] | None = None) -> None:
        """Marks the scheduled tokens computed (call after the runner ran the step, before appending its
        tokens). `num_rejected`: per request, the proposed tokens the model did not accept; their K/V is
        dropped and the blocks that only they used are released."""
        for scheduled in output.requests:
            request = self.requests.get(scheduled.request_id)
            if request is not None:
                rejected = (num_rejected or {}).get(scheduled.request_id, 0)
                request.num_computed_tokens += scheduled.num_tokens - rejected
                request.spec_token_ids = []
                if rejected:  # keep a block for the token sampled after the last accepted one
                    self.kv_cache.trim(request, request.num_computed_tokens + 1)
