"""Speculative decoding in the engine (embedded model, batch-invariant): greedy outputs equal decoding without
it, in batches and under preemption; code that restates its prompt gets most proposals accepted; the
counters reach /metrics."""
import pytest

from ember import LLM, SamplingParams
from ember.engine.async_engine import AsyncEngine
from ember.server.metrics import _EngineCollector

# Code whose continuation restates its prompt: acceptance must be high.
RESTATE = "PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]\n\n\ndef test_primes():\n    assert PRIMES == [2, 3, 5, 7,"
PROMPTS = [RESTATE, "Once upon a time", "List three colors:", "The capital of France is",
           "def fib(n):\n    if n < 2:\n        return n\n", "import os\nimport sys\n\n", "Q: What is 2 + 2?\nA:",
           "<html>\n  <body>\n    <ul>\n      <li>one</li>\n      <li>two</li>\n"]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
OPTIONS = dict(progress=False, max_model_len=512, batch_invariant=True)


def texts(outputs):
    return [o.outputs[0].text for o in outputs]


@pytest.fixture(scope="module")
def reference(llm):
    return texts(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def speculative():
    return LLM(kv_cache_memory_gib=0.1, speculative="ngram", num_speculative_tokens=4, **OPTIONS)


def test_greedy_outputs_equal_and_restated_code_is_accepted(speculative, reference):
    stats = speculative.engine.spec_stats
    [restated] = speculative.generate([RESTATE], GREEDY, use_tqdm=False)
    assert restated.outputs[0].text == reference[0]
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens / stats.num_draft_tokens > 0.6, stats
    assert stats.num_drafts < 24 / 2  # fewer steps than tokens
    assert texts(speculative.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference  # in one batch of 8
    speculative.engine.kv_cache.check_integrity()
    assert speculative.engine.kv_cache.num_free_blocks == speculative.engine.kv_cache.num_blocks


def test_greedy_outputs_equal_under_preemption(reference):
    small = LLM(num_kv_blocks=9, enable_prefix_caching=False, speculative="ngram", **OPTIONS)
    assert texts(small.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.spec_stats.num_accepted_tokens > 0
    assert small.engine.kv_cache.num_free_blocks == 9


def test_sampled_requests_and_metrics(speculative):
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=16)
    [first] = speculative.generate([RESTATE], seeded, use_tqdm=False)
    [again] = speculative.generate([RESTATE], seeded, use_tqdm=False)
    assert first.outputs[0].text == again.outputs[0].text  # a seed still reproduces
    stats = speculative.engine.spec_stats
    families = {f.name: f for f in _EngineCollector(AsyncEngine(speculative.engine), "m").collect()}
    assert families["ember:spec_decode_num_draft_tokens"].samples[0].value == stats.num_draft_tokens > 0
    assert families["ember:spec_decode_num_accepted_tokens"].samples[0].value == stats.num_accepted_tokens
    per_position = [s.value for s in families["ember:spec_decode_num_accepted_tokens_per_pos"].samples]
    assert per_position == stats.accepted_per_position and per_position[0] >= per_position[-1]


def test_draft_model_proposals(reference):
    # The embedded model as its own draft: every greedy proposal matches, and outputs stay the same.
    from ember.loader.hub import embedded_model_path

    drafted = LLM(kv_cache_memory_gib=0.1, speculative="draft", draft_model=embedded_model_path(), **OPTIONS)
    assert texts(drafted.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference
    stats = drafted.engine.spec_stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    drafted.engine.draft.kv_cache.check_integrity()
