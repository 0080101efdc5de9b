"""Engine fixtures: one embedded-model LLM per test session (loading costs seconds)."""
import pytest

from ember import LLM


@pytest.fixture(scope="session")
def llm():
    return LLM(progress=False, max_model_len=1024, kv_cache_memory_gib=0.25)
