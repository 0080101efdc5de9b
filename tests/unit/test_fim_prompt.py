"""The editor's prompt builder drops, before tokenizing, only text that could never fit: a file of megabytes
gives the same prompt as the part of it that fits."""
import types

from ember.config import ServerConfig
from ember.sampling_params import SamplingParams
from ember.server.editor import FimRequest
from ember.server.fim_prompt import FimPromptBuilder
from ember.server.serving import Serving


def builder(tokenizer, max_token_chars: int) -> FimPromptBuilder:
    serving = types.SimpleNamespace(tokenizer=tokenizer, config=ServerConfig(), max_model_len=256,
                                    max_token_chars=max_token_chars)
    serving.check_context = types.MethodType(Serving.check_context, serving)
    return FimPromptBuilder(serving, None)  # prefix-only: the embedded model has no FIM tokens


def test_huge_inputs_build_the_prompt_their_fitting_part_builds(embedded_tokenizer):
    lines = [f"value_{i} = compute({i}, {i * 7} + offset)  # line {i}\n" for i in range(4000)]  # ~200 KB, 25x what fits
    request = FimRequest(prefix="".join(lines), suffix="".join(lines[:2000]),
                         extra_files=[("big.py", "".join(lines))] + [(f"f{i}.py", "x = 1\n" * 500) for i in range(40)],
                         params=SamplingParams(max_tokens=16))
    exact = builder(embedded_tokenizer, max_token_chars=10**9)  # the bound never applies: everything tokenized
    bounded = builder(embedded_tokenizer, max_token_chars=max(map(len, embedded_tokenizer.get_vocab())) + 1)
    ids, _, is_truncated = bounded.build(request)
    exact_ids, _, exact_is_truncated = exact.build(request)
    assert ids == exact_ids and is_truncated and exact_is_truncated
    assert 100 < len(ids) <= 256 - 16
