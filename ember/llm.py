"""The offline API: LLM(model).generate(prompts, SamplingParams(...)) and .chat(messages), no server."""
from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from ember.config import EngineConfig
from ember.engine.engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class LLM:
    """`LLM()` loads the embedded SmolLM2; `LLM("path/to/model.gguf")` or a Hugging Face folder or hub id.

    Keyword arguments are engine config fields (e.g. `max_model_len`, `kv_cache_memory_gib`, `num_threads`).
    """

    def __init__(self, model: str | None = None, progress: bool = True, config: EngineConfig | None = None, **engine_options):
        if config is None:
            config = EngineConfig.from_flat(model=model, **engine_options)
        self.engine = LLMEngine(config, progress=progress)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = _per_prompt(sampling_params, len(prompts))
        request_ids = []
        for prompt, p in zip(prompts, params):
            if isinstance(prompt, str):
                request_ids.append(self.engine.add_request(prompt=prompt, params=p))
            else:
                request_ids.append(self.engine.add_request(prompt_token_ids=list(prompt), params=p))
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates. Special-token spellings inside
        the messages are plain text (`Tokenizer.encode_chat`)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.encode_chat(c, add_generation_prompt) for c in conversations]
        params = _per_prompt(sampling_params, len(prompts))
        request_ids = [
            self.engine.add_request(prompt=text, params=p, prompt_token_ids=token_ids)
            for (text, token_ids), p in zip(prompts, params)
        ]
        return self._run(request_ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm or len(request_ids) < 2) as bar:
            try:
                while wanted - finished.keys():
                    for output in self.engine.step():
                        if output.finished and output.request_id in wanted:
                            finished[output.request_id] = output
                            bar.update(1)
            except BaseException:
                for request_id in wanted - finished.keys():
                    self.engine.abort_request(request_id)
                raise
        return [finished[request_id] for request_id in request_ids]


def _per_prompt(params, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    return list(params)
