"""Constrained generation in the engine (embedded model): outputs obey their schema, regex, choice or grammar,
and share batches with unconstrained requests without changing them."""
import json
import re

import jsonschema
import pytest
import torch

from ember import SamplingParams
from ember.runner.sampler import apply_token_bitmasks
from ember.sampling_params import InvalidParameterError, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "items": {
            "type": "array", "minItems": 1, "maxItems": 2,
            "items": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 6},
                                                       "qty": {"type": "number", "minimum": 1, "maximum": 9}},
                      "required": ["sku", "qty"]},
        },
        "paid": {"type": "boolean"},
    },
    "required": ["id", "items", "paid"],
}
SCHEMAS = [PERSON, ORDER, {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4}]


def constrained(max_tokens=64, temperature=0.0, **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=7, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


@pytest.fixture(scope="module")
def fast_llm():
    """The default engine (int4 decode, not batch-invariant): these tests need valid outputs, not bitwise ones."""
    from ember import LLM

    return LLM(progress=False, max_model_len=512, kv_cache_memory_gib=0.1)


def test_outputs_obey_their_constraints(fast_llm):
    # One batch: greedy and sampled JSON schemas, a JSON object, a regex, a choice and a GBNF grammar.
    cases = [(schema, t) for schema in SCHEMAS for t in (0.0, 1.0)]
    prompts = ["Write one record as JSON:"] * len(cases)
    params = [constrained(80, t, json=schema) for schema, t in cases]
    # (json_object in a chat turn: after the bare "A user record in JSON:" this 135M model loops on digits)
    prompts += ["<|im_start|>user\nGive me a JSON object with a name and an age.<|im_end|>\n<|im_start|>assistant\n", "Call me at", "The capital of France is", "Answer yes or no: is the sky blue?"]
    params += [
        constrained(48, json_object=True),
        constrained(24, regex=r"\(\d{3}\) \d{3}-\d{4}"),
        constrained(8, choice=["Paris", "London", "Rome"]),
        constrained(8, grammar='root ::= ("yes" | "no") "."'),
    ]
    outputs = [o.outputs[0] for o in fast_llm.generate(prompts, params)]
    assert all(o.finish_reason == "stop" for o in outputs), [o.text for o in outputs]
    for (schema, _), output in zip(cases, outputs):
        jsonschema.validate(json.loads(output.text), schema)
    json_object, phone, city, answer = outputs[len(cases):]
    assert isinstance(json.loads(json_object.text), dict)
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone.text)
    assert city.text in ("Paris", "London", "Rome")
    assert answer.text in ("yes.", "no.")


def test_cut_off_structure_finishes_with_length(fast_llm):
    [output] = fast_llm.generate(["Write one record as JSON:"], constrained(5, json=ORDER))
    completion = output.outputs[0]
    assert completion.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(completion.text)


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0, max_tokens=16)
    schema = constrained(40, json=PERSON)
    [free_alone] = llm.generate(["Once upon a time"], free)
    [schema_alone] = llm.generate(["Write one record as JSON:"], schema)
    batch = llm.generate(["Once upon a time", "Write one record as JSON:"], [free, schema])
    assert batch[0].outputs[0].text == free_alone.outputs[0].text
    assert batch[1].outputs[0].text == schema_alone.outputs[0].text
    jsonschema.validate(json.loads(batch[1].outputs[0].text), PERSON)


@pytest.mark.parametrize("constraint, message", [
    ({"json": {"type": "objec"}}, "structured_outputs.json cannot be compiled"),
    ({"regex": "(ab"}, "structured_outputs.regex cannot be compiled"),
    ({"grammar": "root ::= missing"}, 'Rule "missing" is not defined'),
    ({"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    ({"choice": []}, "structured_outputs.choice must be a non-empty list"),
    ({"regex": "a", "choice": ["a"]}, "needs exactly one of"),
])
def test_bad_constraints_are_rejected_before_generation(llm, constraint, message):
    with pytest.raises(InvalidParameterError, match=re.escape(message)):
        llm.generate(["Hi"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**constraint)))
    assert not llm.engine.has_unfinished_requests()


def test_bitmask_matches_xgrammar_reference():
    xgrammar = pytest.importorskip("xgrammar")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=generator)
    ours = logits.clone()
    apply_token_bitmasks(ours, [0, 2], bitmask[[0, 2]])
    reference = logits.clone()
    xgrammar.apply_token_bitmask_inplace(reference, bitmask, indices=[0, 2], backend="torch_native")
    assert torch.equal(ours, reference)
