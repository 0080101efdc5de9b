"""SamplingParams refuses, on arrival, every value that would raise or mislead inside a step."""
import pytest

from ember.sampling_params import FLOAT32_TINY, MAX_SEED, MIN_SEED, InvalidParameterError, SamplingParams


@pytest.mark.parametrize("fields,param", [
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"seed": MIN_SEED - 1}, "seed"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"presence_penalty": float("-inf")}, "presence_penalty"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"stop": ["ok", 3]}, "stop"),
])
def test_out_of_range_values_name_their_field(fields, param):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_seeds_at_the_ends_of_the_range_are_taken_and_children_wrap():
    assert SamplingParams(seed=MIN_SEED).seed == MIN_SEED
    params = SamplingParams(seed=MAX_SEED, n=3)
    assert [params.child_seed(i) for i in range(3)] == [MAX_SEED, 0, 1]
    assert SamplingParams(seed=5, n=2).child_seed(1) == 6


def test_values_float32_cannot_tell_from_zero_are_their_limit():
    assert SamplingParams(temperature=1e-300).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(top_p=1e-300).top_p == FLOAT32_TINY
    assert SamplingParams(temperature=0.5).temperature == 0.5
