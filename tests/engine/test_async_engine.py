"""AsyncEngine.from_config (what `ember serve` runs): the engine is built on the thread that steps it, so the
process keeps one OpenMP pool (async_engine's docstring: a second pool made every CPU step ~1.8x slower),
and it still serves."""
import asyncio
import threading

from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import LLMEngine
from ember.sampling_params import SamplingParams


def test_engine_is_built_and_stepped_on_one_thread(monkeypatch):
    threads = {"build": set(), "step": set()}
    build, step = LLMEngine.__init__, LLMEngine.step

    def recording_build(self, *args, **kwargs):
        threads["build"].add(threading.get_ident())
        build(self, *args, **kwargs)

    def recording_step(self):
        threads["step"].add(threading.get_ident())
        return step(self)

    monkeypatch.setattr(LLMEngine, "__init__", recording_build)
    monkeypatch.setattr(LLMEngine, "step", recording_step)
    engine = AsyncEngine.from_config(EngineConfig.from_flat(max_model_len=256, kv_cache_memory_gib=0.05))

    async def run() -> str:
        stream = await engine.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        text = ""
        async for output in stream:
            text = output.outputs[0].text
        await engine.shutdown()
        return text

    assert asyncio.run(run())
    assert len(threads["build"]) == 1 and threads["step"] == threads["build"]
    assert threads["build"] != {threading.get_ident()}  # not the caller's (the event loop's) thread
