"""Draft-model proposals: a second, smaller model of the same vocabulary, run by its own runner and KV pool,
greedily continues each speculating request by k tokens.

The draft keeps its own paged KV cache (a `KVCacheManager` without prefix caching) and, per request, how
many of the request's tokens it has computed. Each step it first forgets what it computed past the
request's last token but one (its K/V there was for proposals, some of them rejected since), then catches
up on the tokens it has not seen and proposes. Greedy proposals are one-hot, so the rejection rule keeps
the target's distribution for sampled requests too.
"""
from __future__ import annotations

import dataclasses
import logging

from ember.config import EngineConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from ember.loader import load_checkpoint
from ember.runner.device import resolve_device, resolve_dtype, resolve_quantization
from ember.runner.model_runner import ModelRunner
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


@dataclasses.dataclass
class _DraftSequence:
    """What KVCacheManager reads of a request, with the draft's own computed count."""

    request_id: str
    all_token_ids: list[int]  # the request's list, shared
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class DraftProposer:
    def __init__(self, config: EngineConfig, target_vocab_size: int, eos_token_ids: set[int], progress: bool):
        path = config.speculation.draft_model
        device = resolve_device(config.model.device)
        checkpoint = load_checkpoint(path, dtype=resolve_dtype(config.model.dtype, device), progress=progress,
                                     int4_blocks=True)
        vocab_size = checkpoint.hf_config["vocab_size"]
        if vocab_size != target_vocab_size:
            raise ValueError(f"the draft model {path} has a vocabulary of {vocab_size} tokens, the target {target_vocab_size}: "
                             "a draft model must share the target's tokenizer")
        # The draft's own KV budget: a tenth of the target's is plenty for a model of a tenth its size or less.
        cache = dataclasses.replace(config.cache, enable_prefix_caching=False, num_kv_blocks=None,
                                    kv_cache_memory_gib=max(config.cache.kv_cache_memory_gib / 10, 0.05))
        draft_config = dataclasses.replace(config, cache=cache)
        self.runner = ModelRunner(draft_config, checkpoint.hf_config, checkpoint.tensors, eos_token_ids,
                                  quantize=resolve_quantization(config.model.quantize, checkpoint.is_low_bit, device),
                                  profile_kv_memory=False)  # its own small budget, on a GPU too
        self.kv_cache = KVCacheManager(self.runner.num_blocks, cache.block_size, enable_prefix_caching=False)
        self.sequences: dict[str, _DraftSequence] = {}

    def propose(self, requests: list, num_tokens: list[int]) -> list[list[int]]:
        """Greedy continuations: up to num_tokens[i] tokens for requests[i] (engine `Request`s in decode)."""
        live = {r.request_id for r in requests}
        for request_id in [i for i in self.sequences if i not in live]:
            self._drop(request_id)
        proposals: list[list[int]] = [[] for _ in requests]
        active = []  # (index, draft sequence, pending tokens to feed)
        for i, request in enumerate(requests):
            sequence = self.sequences.setdefault(request.request_id, _DraftSequence(request.request_id, request.all_token_ids))
            if sequence.num_computed_tokens > request.num_tokens - 1:
                # Positions from here held proposals; the last token is fed again for its logits.
                sequence.num_computed_tokens = request.num_tokens - 1
                self.kv_cache.trim(sequence, request.num_tokens)
            active.append((i, sequence, request.all_token_ids[sequence.num_computed_tokens:]))
        for step in range(max(num_tokens, default=0)):
            batch = []
            for i, sequence, pending in active:
                if step < num_tokens[i] and pending and self._allocate(sequence, len(pending)):
                    batch.append((i, sequence, pending))
            if not batch:
                break
            scheduled = [self._scheduled(sequence, pending) for _, sequence, pending in batch]
            sampled = self.runner.execute(SchedulerOutput(requests=scheduled))
            active = []
            for (i, sequence, pending), s in zip(batch, scheduled):
                sequence.num_computed_tokens += len(pending)
                token = sampled[s.request_id][0].token_id
                proposals[i].append(token)
                active.append((i, sequence, [token]))
        return proposals

    def _allocate(self, sequence: _DraftSequence, num_new: int) -> bool:
        if self.kv_cache.allocate_slots(sequence, num_new):
            return True
        self._drop(sequence.request_id)  # out of draft blocks: this request starts over next time
        return False

    def _drop(self, request_id: str) -> None:
        sequence = self.sequences.pop(request_id, None)
        if sequence is not None:
            self.kv_cache.free(sequence)

    def _scheduled(self, sequence: _DraftSequence, pending: list[int]) -> ScheduledRequest:
        return ScheduledRequest(
            request_id=sequence.request_id,
            token_ids=pending,
            start_position=sequence.num_computed_tokens,
            block_ids=list(self.kv_cache.block_ids(sequence.request_id)),
            do_sample=True,
            params=_GREEDY,
            prompt_token_ids=[],
            output_token_ids=[],
        )
