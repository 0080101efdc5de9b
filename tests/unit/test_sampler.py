"""The batched sampler on hand-made logits: each option's effect, seeds, logprobs, batch independence."""
import math
from dataclasses import dataclass, field

import pytest
import torch

from ember.runner.sampler import Sampler
from ember.sampling_params import InvalidParameterError, SamplingParams

EOS = 9


@dataclass
class Req:  # the fields of ScheduledRequest the sampler reads
    params: SamplingParams
    prompt_token_ids: list = field(default_factory=list)
    output_token_ids: list = field(default_factory=list)


def sample(logits, *params, outputs=None, generators=None):
    requests = [Req(p, [], list((outputs or {}).get(i, []))) for i, p in enumerate(params)]
    return Sampler({EOS})(torch.tensor(logits, dtype=torch.float32), requests, generators or [None] * len(params))


def test_greedy_takes_argmax():
    tokens = sample([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]], SamplingParams(temperature=0), SamplingParams(temperature=0))
    assert [t.token_id for t in tokens] == [1, 0]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = [[0.0, 1.0, 0.5, 0.9]]
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=0.01)):
        for seed in range(20):
            assert sample(logits, params, generators=[torch.Generator().manual_seed(seed)])[0].token_id == 1


def test_min_p_removes_unlikely_tokens():
    logits = [[math.log(0.5), math.log(0.45), math.log(0.05)]]
    params = SamplingParams(temperature=1.0, min_p=0.2)  # threshold 0.1: token 2 never drawn
    drawn = {sample(logits, params, generators=[torch.Generator().manual_seed(s)])[0].token_id for s in range(200)}
    assert drawn == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.2, 0.5, 0.3])
    params = SamplingParams(temperature=1.0, seed=0)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample([probs.log().tolist()], params, generators=[generator])[0].token_id] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_same_seed_same_tokens_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    alone = [sample(logits[:1].tolist(), seeded, generators=[torch.Generator().manual_seed(7)])[0].token_id for _ in range(1)]
    gens = [torch.Generator().manual_seed(7), None, None, None]
    batched = sample(logits.tolist(), seeded, SamplingParams(temperature=1.0), SamplingParams(temperature=0),
                     SamplingParams(temperature=2.0, top_k=5), generators=gens)
    assert batched[0].token_id == alone[0]


def test_penalties():
    logits = [[2.0, 2.0, -1.0]]
    # Repetition penalty divides a positive logit of a seen token, multiplies a negative one.
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.0), outputs={0: [0]})[0].token_id == 1
    assert sample(logits, SamplingParams(temperature=0, presence_penalty=0.5), outputs={0: [1]})[0].token_id == 0
    assert sample([[2.0, 2.5]], SamplingParams(temperature=0, frequency_penalty=0.3), outputs={0: [1, 1]})[0].token_id == 0


def test_min_tokens_bans_eos_and_stop_tokens():
    logits = [[0.0] * 9 + [10.0]]
    params = SamplingParams(temperature=0, min_tokens=2)
    assert sample(logits, params, outputs={0: [1]})[0].token_id != EOS
    assert sample(logits, params, outputs={0: [1, 2]})[0].token_id == EOS


def test_logprobs_of_sampled_and_top_alternatives():
    logits = [[1.0, 3.0, 2.0]]
    token = sample(logits, SamplingParams(temperature=0, logprobs=2))[0]
    expected = torch.log_softmax(torch.tensor(logits[0]), -1)
    assert [t for t, _ in token.logprobs] == [1, 1, 2]
    assert token.logprobs[0][1] == pytest.approx(expected[1].item())
    assert token.logprobs[2][1] == pytest.approx(expected[2].item())
    assert sample(logits, SamplingParams(temperature=0))[0].logprobs is None


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0),
                                         ("n", 0), ("min_p", 2), ("top_k", -2), ("logprobs", 21)])
def test_invalid_parameters_name_themselves(field, value):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_a_top_p_below_float32_range_keeps_the_top_token():
    """top_p 1e-300 is 0 in float32: the nucleus still holds the most likely token (it once held nothing)."""
    import torch

    from ember.runner.sampler import sampling_probs
    from ember.sampling_params import SamplingParams

    class Row:
        params = SamplingParams(temperature=1.0)
        params.top_p = 0.0  # what float32 makes of 1e-300

    probs = sampling_probs(torch.tensor([[0.0, 3.0, 1.0]]), [Row()])
    assert probs[0].nonzero().flatten().tolist() == [1]
