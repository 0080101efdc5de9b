"""Speculative decoding without a model: n-gram proposals, the rejection rule (statistically), and the
scheduler / KV-cache bookkeeping of proposed tokens (exact block ids)."""
from dataclasses import dataclass, field

import pytest
import torch

from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.ngram_proposer import propose_ngram
from ember.engine.request import Request
from ember.engine.scheduler import Scheduler
from ember.runner.rejection_sampler import verify_proposals
from ember.sampling_params import SamplingParams


def test_ngram_takes_the_latest_longest_match():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 2, 3, 4]
    assert propose_ngram(tokens, 2, 3, 3) == [6, 7, 8]  # "2 3 4" last seen before 6 7 8
    assert propose_ngram(tokens, 2, 3, 1) == [6]
    assert propose_ngram([5, 6, 7, 5, 6], 2, 4, 4) == [7, 5, 6]  # may run up to the end
    assert propose_ngram([1, 2, 3, 4], 2, 4, 4) == []  # no suffix recurs
    assert propose_ngram([1, 2, 9, 3, 2], 1, 3, 2) == [9, 3]  # falls back to a 1-gram


@dataclass
class Req:  # the fields of ScheduledRequest the verifier reads
    params: SamplingParams
    token_ids: list
    num_spec_tokens: int
    prompt_token_ids: list = field(default_factory=list)
    output_token_ids: list = field(default_factory=list)


def test_greedy_keeps_proposals_up_to_the_first_disagreement():
    logits = torch.eye(5)[[1, 2, 4, 0]]  # argmax per row: 1, 2, 4, 0
    greedy = SamplingParams(temperature=0)
    out = verify_proposals(logits, [Req(greedy, [7, 1, 2, 3], 3)], [None])
    assert out == [[1, 2, 4]]  # 1 and 2 kept, 3 rejected: the target's 4 instead
    out = verify_proposals(logits, [Req(greedy, [7, 1, 2, 4], 3)], [None])
    assert out == [[1, 2, 4, 0]]  # all kept, plus one more


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4)])
def test_rejection_rule_keeps_the_target_distribution(params):
    # Two positions with known distributions; proposals one likely, one unlikely. Output token 1 must follow
    # position 1's distribution, and output token 2 (present when proposal 1 was kept) position 2's.
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.0, 0.4, 1.5, 1.0, 0.2, -0.5], [1.0] * 6])
    proposals = [0, 4]
    num_samples = 5000
    requests = [Req(params, [3, *proposals], 2)] * num_samples
    out = verify_proposals(rows.repeat(num_samples, 1), requests, [generator] * num_samples)

    def target(row):
        from ember.runner.sampler import sampling_probs
        probs = sampling_probs(row[None], [requests[0]])[0]
        return probs / probs.sum()

    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=6).float() / num_samples
    kept = [o for o in out if o[0] == proposals[0] and len(o) > 1]
    second = torch.bincount(torch.tensor([o[1] for o in kept]), minlength=6).float() / len(kept)
    # total variation distance: sampling noise at these counts is ~0.02; dropping the residual rule costs > 0.1
    assert 0.5 * (first - target(rows[0])).abs().sum() < 0.04
    assert 0.5 * (second - target(rows[1])).abs().sum() < 0.06


def make_scheduler(num_blocks=8, block_size=4):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv), kv


def test_proposals_are_scheduled_verified_and_their_blocks_released():
    scheduler, kv = make_scheduler()
    request = Request("a", list(range(100, 107)), SamplingParams(max_tokens=20), max_tokens=20)  # 7 prompt tokens
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out)
    request.append_output_token(200)  # 8 tokens, 7 computed: a decode
    request.spec_token_ids = [201, 202, 203, 204, 205]
    out = scheduler.schedule()
    [scheduled] = out.requests
    assert scheduled.token_ids == [200, 201, 202, 203, 204, 205] and scheduled.num_spec_tokens == 5
    assert scheduled.start_position == 7 and scheduled.do_sample
    assert kv.block_ids("a") == [0, 1, 2, 3]  # 13 positions
    # Blocks of proposed tokens are not in the prefix cache: only block 1 (tokens 4-7, all the request's own).
    assert sorted(kv.cached.values()) == [0, 1]
    scheduler.update_from_output(out, {"a": 3})  # 2 of 5 kept
    assert request.num_computed_tokens == 10 and request.spec_token_ids == []
    assert kv.block_ids("a") == [0, 1, 2]  # 10 computed + the next token fit in 3 blocks; block 3 released
    assert kv.blocks[3].ref_count == 0 and kv.num_free_blocks == 5
    kv.check_integrity()


def test_a_budget_cuts_the_proposals():
    kv = KVCacheManager(8, 4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=3), kv)
    request = Request("a", [1, 2, 3], SamplingParams(max_tokens=9), max_tokens=9)
    scheduler.add_request(request)
    scheduler.update_from_output(scheduler.schedule())
    request.append_output_token(4)
    request.spec_token_ids = [5, 6, 7, 8]
    [scheduled] = scheduler.schedule().requests
    assert scheduled.token_ids == [4, 5, 6] and scheduled.num_spec_tokens == 2
    assert request.spec_token_ids == [5, 6]
