"""The scheduler with no model: token budget, chunked prefill, prefix hits, preemption, abort."""
from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.request import Request, RequestStatus
from ember.engine.scheduler import Scheduler
from ember.sampling_params import SamplingParams


def make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, chunked=True):
    kv = KVCacheManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, kv)


def add(scheduler, request_id, num_prompt_tokens, first_token=0, priority=0, arrival=None):
    request = Request(request_id, list(range(first_token, first_token + num_prompt_tokens)), SamplingParams(),
                      max_tokens=16, priority=priority, arrival_time=arrival)
    scheduler.add_request(request)
    return request


def run_step(scheduler, next_token=1000):
    """Schedules, marks the step computed, and appends a sampled token where one was sampled."""
    output = scheduler.schedule()
    scheduler.update_from_output(output)
    for scheduled in output.requests:
        if scheduled.do_sample:
            scheduler.requests[scheduled.request_id].append_output_token(next_token)
    scheduler.kv_cache.check_integrity()
    return output


def summary(output):
    return [(r.request_id, r.start_position, r.num_tokens, r.do_sample) for r in output.requests]


def test_prefill_then_decode_one_rule():
    s = make_scheduler()
    add(s, "a", 10)
    add(s, "b", 5, first_token=100)
    assert summary(run_step(s)) == [("a", 0, 10, True), ("b", 0, 5, True)]
    assert summary(run_step(s)) == [("a", 10, 1, True), ("b", 5, 1, True)]
    assert s.kv_cache.block_ids("a") == [0, 1, 2]
    assert s.kv_cache.block_ids("b") == [3, 4]


def test_chunked_prefill_within_token_budget():
    s = make_scheduler(max_num_batched_tokens=8)
    add(s, "a", 20)
    add(s, "b", 3, first_token=100)
    assert summary(run_step(s)) == [("a", 0, 8, False)]
    assert summary(run_step(s)) == [("a", 8, 8, False)]
    # a's last chunk (4 tokens) samples; b fills the remaining budget.
    assert summary(run_step(s)) == [("a", 16, 4, True), ("b", 0, 3, True)]
    assert summary(run_step(s)) == [("a", 20, 1, True), ("b", 3, 1, True)]


def test_without_chunking_a_long_prompt_waits_for_room():
    s = make_scheduler(max_num_batched_tokens=8, chunked=False)
    add(s, "a", 6)
    add(s, "b", 6, first_token=100)
    assert summary(run_step(s)) == [("a", 0, 6, True)]
    assert summary(run_step(s)) == [("a", 6, 1, True), ("b", 0, 6, True)]


def test_prefix_cache_hit_starts_further_along():
    s = make_scheduler()
    a = add(s, "a", 9)
    run_step(s)
    s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert a.status == RequestStatus.FINISHED_STOPPED
    b = add(s, "b", 9)  # same 9 tokens: 2 full blocks hit
    assert summary(run_step(s)) == [("b", 8, 1, True)]
    assert b.num_cached_tokens == 8
    assert s.kv_cache.block_ids("b")[:2] == [0, 1]
    assert (s.kv_cache.num_prefix_queries, s.kv_cache.num_prefix_hits) == (18, 8)


def test_preemption_frees_newest_and_recomputes_it():
    s = make_scheduler(num_blocks=4, block_size=4)
    add(s, "a", 8)  # 2 blocks
    add(s, "b", 7, first_token=100)  # 2 blocks
    run_step(s)  # a: 9 tokens, b: 8 tokens
    assert s.kv_cache.num_free_blocks == 0
    # a needs a third block for its 9th token: b (newest) is preempted.
    output = run_step(s)
    assert output.preempted_request_ids == ["b"]
    assert summary(output) == [("a", 8, 1, True)]
    b = s.requests["b"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert s.kv_cache.block_ids("b") == []
    assert s.num_preemptions == 1
    s.finish_request("a", RequestStatus.FINISHED_LENGTH)
    # b comes back: its first block is still in the prefix cache, the rest is recomputed.
    assert summary(run_step(s)) == [("b", 4, 4, True)]


def test_request_preempts_itself_when_alone_without_room():
    s = make_scheduler(num_blocks=2, block_size=4)
    add(s, "a", 8)
    run_step(s)
    output = run_step(s)
    assert output.preempted_request_ids == ["a"]
    assert output.requests == []


def test_abort_at_any_time_frees_blocks():
    s = make_scheduler(max_num_batched_tokens=4)
    add(s, "a", 10)
    add(s, "b", 3, first_token=100)
    run_step(s)  # a is mid-prefill
    s.finish_request("a", RequestStatus.FINISHED_ABORTED)
    s.finish_request("b", RequestStatus.FINISHED_ABORTED)  # still waiting
    assert s.kv_cache.num_free_blocks == s.kv_cache.num_blocks
    output = s.schedule()
    assert output.requests == [] and output.finished_request_ids == {"a", "b"}
    assert s.num_unfinished == 0
    s.kv_cache.check_integrity()


def test_max_num_seqs_and_priority_order():
    s = make_scheduler(max_num_seqs=2)
    add(s, "chat", 4, arrival=1.0)
    add(s, "chat2", 4, first_token=50, arrival=2.0)
    add(s, "editor", 4, first_token=100, priority=-1, arrival=3.0)
    assert [r.request_id for r in run_step(s).requests] == ["editor", "chat"]


def test_better_priority_goes_before_running_prefill_and_takes_a_full_slot():
    s = make_scheduler(max_num_batched_tokens=8, max_num_seqs=2)
    add(s, "chat", 20, arrival=0.0)
    assert summary(run_step(s)) == [("chat", 0, 8, False)]
    # An editor completion (priority -1) gets the budget ahead of the chat's remaining prefill.
    add(s, "fim", 3, first_token=100, priority=-1, arrival=1.0)
    assert summary(run_step(s)) == [("fim", 0, 3, True), ("chat", 8, 5, False)]
    assert [r.request_id for r in s.running] == ["fim", "chat"]
    # With every slot taken by lower priorities, a better one preempts the last of them.
    add(s, "fim2", 2, first_token=200, priority=-1, arrival=2.0)
    output = run_step(s)
    assert output.preempted_request_ids == ["chat"]
    assert summary(output) == [("fim", 3, 1, True), ("fim2", 0, 2, True)]
    assert s.requests["chat"].status == RequestStatus.PREEMPTED and s.requests["chat"].num_computed_tokens == 0
    # Equal priorities never preempt each other for a slot.
    add(s, "fim3", 2, first_token=300, priority=-1, arrival=3.0)
    assert summary(run_step(s)) == [("fim", 4, 1, True), ("fim2", 2, 1, True)]
    s.finish_request("fim", RequestStatus.FINISHED_STOPPED)
    s.finish_request("fim2", RequestStatus.FINISHED_STOPPED)
    # The chat resumes from its full blocks still in the prefix cache: 2 of its 3. Freed blocks are
    # reused before never-used ones, least recently freed first, and its tail block went to fim3.
    assert summary(run_step(s)) == [("fim3", 0, 2, True), ("chat", 8, 6, False)]
