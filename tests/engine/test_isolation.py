"""A request that makes a step fail fails alone: the step is retried one request at a time, the others go on
with the tokens they have when run alone, and the failed one's K/V never serves as a cached prefix."""
import asyncio

from ember import SamplingParams
from ember.engine.async_engine import AsyncEngine, RequestFailedError

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time,"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def poisoned_params() -> SamplingParams:
    """Params that pass validation, then break the sampler inside a step: the generator cannot take the seed
    (what an out-of-range seed did before seeds were checked on arrival)."""
    params = SamplingParams(temperature=0.8, max_tokens=12, seed=1)
    params.seed = 2**70
    return params


def run_to_end(engine, request_ids):
    finished = {}
    while len(finished) < len(request_ids):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


def test_failing_request_fails_alone(llm):
    engine = llm.engine
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    ids = [engine.add_request(prompt=p, params=GREEDY) for p in PROMPTS[:2]]
    poisoned = engine.add_request(prompt="A poisoned prompt that fills a whole block of sixteen tokens, or more.",
                                  params=poisoned_params())
    ids.append(engine.add_request(prompt=PROMPTS[2], params=GREEDY))
    finished = run_to_end(engine, ids + [poisoned])
    assert [finished[i].outputs[0].token_ids for i in ids] == alone
    assert all(finished[i].error is None for i in ids)
    failed = finished[poisoned]
    assert failed.error == "ValueError: Overflow when unpacking long long"  # torch's message for the seed
    assert failed.outputs[0].finish_reason == "error"
    assert not engine.has_unfinished_requests()
    engine.kv_cache.check_integrity()
    # Its prompt's blocks were dropped from the prefix cache: the same prompt computes from scratch.
    again = llm.generate("A poisoned prompt that fills a whole block of sixteen tokens, or more.", GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0


def test_async_stream_of_the_failing_request_gets_its_error(llm):
    async def main():
        engine = AsyncEngine(llm.engine)
        good = await engine.generate(prompt=PROMPTS[0], params=GREEDY)
        bad = await engine.generate(prompt=PROMPTS[1], params=poisoned_params())
        text = "".join([o.outputs[0].text_delta async for o in good])
        try:
            async for _ in bad:
                pass
        except RequestFailedError as exc:
            error = str(exc)
        else:
            error = None
        await engine.shutdown(0)
        return text, error

    text, error = asyncio.run(main())
    assert text == llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert error is not None and error.startswith("the engine failed while running this request")


def test_a_slow_grammar_times_out_and_is_not_compiled_twice(llm):
    """A constraint that misses the compile deadline is a 400-class error; sent again while its compile still
    runs it is refused at once; once that compile has ended, it is served from the cache."""
    from ember.engine.async_engine import QueueFullError
    from ember.sampling_params import InvalidParameterError, StructuredOutputsParams

    slow = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex='[^"]{1,3000}'))
    # Waits behind the slow compile: a busy queue (503), not a constraint of its own that is too slow.
    queued = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="(yes|no)"))

    async def main():
        engine = AsyncEngine(llm.engine, grammar_compile_timeout=0.05)
        errors = []
        for params in (slow, slow, queued):
            try:
                await engine.generate(prompt="Say anything:", params=params)
            except (InvalidParameterError, QueueFullError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        await asyncio.wrap_future(engine._compile_executor.submit(lambda: None))  # the slow compile has ended
        finals = []
        for params in (slow, queued):
            finals.append([o async for o in await engine.generate(prompt="Say anything:", params=params)][-1])
        await engine.shutdown(0)
        return errors, finals

    errors, finals = asyncio.run(main())
    assert errors[0] == "InvalidParameterError: structured_outputs.regex did not compile within 0.05 s"
    assert errors[1].endswith("when last sent; it is not compiled again")
    assert errors[2] == "QueueFullError: other constraints are compiling; try again shortly"
    assert all(f.finished for f in finals) and '"' not in finals[0].outputs[0].text
    assert finals[1].outputs[0].text in ("yes", "no")
