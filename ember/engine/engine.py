"""LLMEngine: add_request / abort_request / step. Owns the scheduler, the runner, stop checks and detokenization."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

from ember.config import EngineConfig
from ember.engine.draft_proposer import DraftProposer
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.ngram_proposer import propose_ngram
from ember.engine.request import Request, RequestStatus
from ember.engine.scheduler import Scheduler
from ember.engine.structured_output import GrammarMatcher, StructuredOutputManager
from ember.loader import load_checkpoint
from ember.loader.hub import embedded_model_path
from ember.outputs import FINISH_ERROR, CompletionOutput, Logprob, RequestOutput
from ember.runner.memory import settle_heap
from ember.runner.device import resolve_device, resolve_dtype, resolve_quantization
from ember.runner.model_runner import ModelRunner
from ember.sampling_params import InvalidParameterError, SamplingParams
from ember.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """Engine-side state of one sample: detokenized text, stop handling, what was already streamed."""

    request: Request
    parent_id: str
    index: int  # within its parent (n > 1)
    detokenizer: IncrementalDetokenizer
    text: str = ""  # output text, cut at a stop string
    num_emitted_chars: int = 0
    logprobs: list[list[Logprob]] | None = None
    finish_reason: str | None = None
    grammar: GrammarMatcher | None = None  # a constrained request's position in its grammar


@dataclass
class ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        path = config.model.model or embedded_model_path()
        device = resolve_device(config.model.device)
        # Q4_0 / Q4_1 matrices as their blocks: the runner repacks them for its int4 kernel or dequantizes them.
        checkpoint = load_checkpoint(path, dtype=resolve_dtype(config.model.dtype, device), progress=progress,
                                     int4_blocks=True)
        self.model_path = checkpoint.path
        if checkpoint.gguf_metadata is not None:
            self.tokenizer = Tokenizer.from_gguf_metadata(checkpoint.gguf_metadata)
        else:
            self.tokenizer = Tokenizer.from_dir(checkpoint.path)
        self.draft = None
        if config.speculation.speculative == "draft":
            # Before the target's runner: on a GPU the target's KV cache gets what is left, the draft's share included.
            self.draft = DraftProposer(config, checkpoint.hf_config["vocab_size"], self.tokenizer.eos_token_ids, progress)
        quantize = resolve_quantization(config.model.quantize, checkpoint.is_low_bit, device)
        self.runner = ModelRunner(config, checkpoint.hf_config, checkpoint.tensors, self.tokenizer.eos_token_ids, quantize)
        self.max_model_len = self.runner.max_model_len
        del checkpoint
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                       num_lookahead_slots=int(self.runner.use_lookahead))
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.speculation = config.speculation
        self.spec_stats = SpecDecodeStats(config.speculation.num_speculative_tokens)
        self.structured_output = StructuredOutputManager(self.tokenizer, self.runner.model.vocab_size, config.num_threads or 2)
        self._parents: dict[str, ParentRequest] = {}
        self._sequences: dict[str, _Sequence] = {}  # by the child request id
        self._failed_outputs: list[RequestOutput] = []  # requests failed this step, reported with its outputs
        self._ids = itertools.count()
        settle_heap()  # the checkpoint's tensors are gone now
        self.kernel_variant = self.runner.backends.kernel_variant  # the kernels in use: /info and /metrics report it
        logger.info("loaded %s on %s (%s): context %d tokens, KV cache %d tokens (%s); %s", path, device,
                    str(self.runner.dtype).removeprefix("torch."), self.max_model_len, self.runner.num_kv_tokens,
                    str(self.runner.kv_dtype).removeprefix("torch."), self.runner.backends.describe())

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None = None,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        priority: int = 0,
    ) -> str:
        """Queues a request (text or token ids); raises InvalidParameterError for a prompt that cannot run."""
        parent = self.prepare_request(request_id, prompt, params, prompt_token_ids, priority)
        self.add_prepared(parent)
        return parent.request_id

    def prepare_request(
        self,
        request_id: str | None = None,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        priority: int = 0,
    ) -> ParentRequest:
        """Tokenizes and validates a request without touching engine state (safe while a step runs)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidParameterError("prompt", "is required")
            prompt_token_ids = self.tokenizer.encode(prompt)
        num_prompt_tokens = len(prompt_token_ids)
        if num_prompt_tokens == 0:
            raise InvalidParameterError("prompt", "is empty")
        vocab_size = self.runner.model.vocab_size
        if any(not 0 <= t < vocab_size for t in prompt_token_ids):
            raise InvalidParameterError("prompt", f"has token ids outside the vocabulary [0, {vocab_size})")
        if num_prompt_tokens >= self.max_model_len:
            raise InvalidParameterError(
                "prompt",
                f"is {num_prompt_tokens} tokens long, but this model's context length is {self.max_model_len} tokens "
                "and at least one must be left to generate",
            )
        max_tokens = self.max_model_len - num_prompt_tokens
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        if self.kv_cache.num_blocks_for(num_prompt_tokens + max_tokens) > self.kv_cache.num_blocks:
            raise InvalidParameterError(
                "prompt",
                f"needs {num_prompt_tokens + max_tokens} tokens of KV cache, but the cache holds "
                f"{self.runner.num_kv_tokens}; lower max_tokens or raise kv_cache_memory_gib",
            )
        if params.min_tokens > max_tokens:
            raise InvalidParameterError(
                "min_tokens", f"is {params.min_tokens}, but at most {max_tokens} tokens fit after this prompt in the "
                f"context of {self.max_model_len} tokens",
            )
        parent = ParentRequest(request_id, prompt, list(prompt_token_ids), params)
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.child_seed(index))
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(child_id, prompt_token_ids, child_params, max_tokens, priority)
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            logprobs = [] if params.logprobs is not None else None
            grammar = None
            if params.structured_outputs is not None:
                grammar = self.structured_output.new_matcher(params.structured_outputs)
            parent.sequences.append(_Sequence(request, request_id, index, detokenizer, logprobs=logprobs, grammar=grammar))
        return parent

    def add_prepared(self, parent: ParentRequest) -> None:
        if parent.request_id in self._parents:
            raise ValueError(f"request id {parent.request_id!r} is already in use")
        self._parents[parent.request_id] = parent
        for sequence in parent.sequences:
            self._sequences[sequence.request.request_id] = sequence
            self.scheduler.add_request(sequence.request)

    def abort_request(self, request_id: str) -> None:
        """Cancels a request at any point; its blocks are freed now. Unknown ids are ignored."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for sequence in parent.sequences:
            self._sequences.pop(sequence.request.request_id, None)
            self.scheduler.finish_request(sequence.request.request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and runs one batch; returns an output for each request that produced text or finished."""
        if self.speculation.speculative != "none":
            self._propose()
        scheduler_output = self.scheduler.schedule()
        token_bitmasks, failed = {}, {}
        for scheduled in scheduler_output.requests:
            sequence = self._sequences.get(scheduled.request_id)
            if scheduled.do_sample and sequence is not None and sequence.grammar is not None:
                try:
                    token_bitmasks[scheduled.request_id] = sequence.grammar.fill_bitmask()
                except Exception as exc:
                    failed[scheduled.request_id] = exc
        runnable = scheduler_output
        if failed:
            runnable = dataclasses.replace(scheduler_output, requests=[r for r in scheduler_output.requests if r.request_id not in failed])
        try:
            sampled = self.runner.execute(runnable, token_bitmasks)
        except Exception:
            logger.exception("a step of %d requests failed; running each alone", len(runnable.requests))
            sampled = self._execute_alone(runnable, token_bitmasks, failed)
        for child_id, exc in failed.items():
            self._fail(child_id, exc)
        num_rejected = {}
        for scheduled in scheduler_output.requests:
            if scheduled.num_spec_tokens and scheduled.request_id in sampled:
                num_accepted = len(sampled[scheduled.request_id]) - 1
                num_rejected[scheduled.request_id] = scheduled.num_spec_tokens - num_accepted
                self.spec_stats.record(scheduled.num_spec_tokens, num_accepted)
        self.scheduler.update_from_output(scheduler_output, num_rejected)
        changed: dict[str, ParentRequest] = {}
        now = time.monotonic()
        for child_id, tokens in sampled.items():
            sequence = self._sequences.get(child_id)
            if sequence is None:  # a sibling (n > 1) failed: the whole request ended
                continue
            try:
                for token in tokens:  # a stop among accepted proposals drops the tokens after it
                    if sequence.finish_reason is None:
                        self._append_token(sequence, token)
            except Exception as exc:
                logger.exception("request %s failed on its new token", child_id)
                self._fail(child_id, exc)
                continue
            parent = self._parents[sequence.parent_id]
            parent.first_token_time = parent.first_token_time or now
            changed[parent.request_id] = parent
        outputs = [self._make_output(parent) for parent in changed.values() if parent.request_id in self._parents]
        for output in outputs:
            if output.finished:
                parent = self._parents.pop(output.request_id)
                for sequence in parent.sequences:
                    self._sequences.pop(sequence.request.request_id, None)
        failed_outputs, self._failed_outputs = self._failed_outputs, []
        return failed_outputs + outputs

    def _execute_alone(self, scheduler_output, token_bitmasks: dict, failed: dict[str, Exception]) -> dict:
        """Runs each request of a failed step on its own: the ones that fail again are `failed`; the rest
        go on as if the step had worked."""
        sampled = {}
        for i, scheduled in enumerate(scheduler_output.requests):
            alone = dataclasses.replace(scheduler_output, requests=[scheduled],
                                        finished_request_ids=scheduler_output.finished_request_ids if i == 0 else set())
            try:
                sampled |= self.runner.execute(alone, token_bitmasks)
            except Exception as exc:
                logger.exception("request %s failed when run alone", scheduled.request_id)
                failed[scheduled.request_id] = exc
        return sampled

    def _fail(self, child_id: str, exc: Exception) -> None:
        """Ends the request that `child_id` belongs to (all its samples) with an error output."""
        sequence = self._sequences.get(child_id)
        if sequence is None:
            return
        parent = self._parents.pop(sequence.parent_id)
        for sibling in parent.sequences:
            self._sequences.pop(sibling.request.request_id, None)
            if sibling.finish_reason is None:
                sibling.finish_reason = FINISH_ERROR
            self.scheduler.finish_request(sibling.request.request_id, RequestStatus.FINISHED_ERROR)
        output = self._make_output(parent)
        output.error = f"{type(exc).__name__}: {exc}"
        self._failed_outputs.append(output)

    def _propose(self) -> None:
        """Proposes the next tokens of each running request in decode that may speculate."""
        config = self.speculation
        requests, nums = [], []
        for request in self.scheduler.running:
            sequence = self._sequences.get(request.request_id)
            if sequence is None or request.num_computed_tokens != request.num_tokens - 1 or not _may_speculate(sequence):
                continue
            # Leave room for the token sampled after the proposals.
            room = min(request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
            if min(config.num_speculative_tokens, room) > 0:
                requests.append(request)
                nums.append(min(config.num_speculative_tokens, room))
        if self.draft is not None:
            proposals = self.draft.propose(requests, nums)
        else:
            proposals = [propose_ngram(r.all_token_ids, config.prompt_lookup_min, config.prompt_lookup_max, n)
                         for r, n in zip(requests, nums)]
        for request, proposal in zip(requests, proposals):
            request.spec_token_ids = proposal

    def _append_token(self, sequence: _Sequence, token) -> None:
        request, params = sequence.request, sequence.request.params
        token_id = token.token_id
        request.append_output_token(token_id)
        if sequence.grammar is not None and not sequence.grammar.accept(token_id):
            logger.error("request %s: sampled token %d is outside its grammar", request.request_id, token_id)
        if sequence.logprobs is not None:
            sequence.logprobs.append([Logprob(t, lp, self.tokenizer.token_text(t)) for t, lp in token.logprobs])
        num_output = request.num_output_tokens
        is_stop_token = token_id in params.stop_token_ids or (
            token_id in self.tokenizer.eos_token_ids and not params.ignore_eos
        )
        # A complete structure has nothing left to generate, whatever min_tokens or ignore_eos say.
        is_grammar_end = sequence.grammar is not None and sequence.grammar.is_terminated
        if (is_stop_token and num_output >= params.min_tokens) or is_grammar_end:
            if params.include_stop_str_in_output:
                sequence.text += sequence.detokenizer.add([token_id])
            self._finish(sequence, RequestStatus.FINISHED_STOPPED, token_id)
            return
        previous_len = len(sequence.text)
        sequence.text += sequence.detokenizer.add([token_id])
        if params.stop and num_output >= params.min_tokens:
            hit = _find_stop(sequence.text, params.stop, previous_len)
            if hit is not None:
                position, stop = hit
                sequence.text = sequence.text[: position + (len(stop) if params.include_stop_str_in_output else 0)]
                self._finish(sequence, RequestStatus.FINISHED_STOPPED, stop)
                return
        if num_output >= request.max_tokens or request.num_tokens >= self.max_model_len:
            sequence.text += sequence.detokenizer.flush()  # a character cut short by the length limit
            self._finish(sequence, RequestStatus.FINISHED_LENGTH, None)

    def _finish(self, sequence: _Sequence, status: RequestStatus, stop_reason) -> None:
        sequence.finish_reason = status.value
        sequence.request.stop_reason = stop_reason
        self.scheduler.finish_request(sequence.request.request_id, status)

    def _make_output(self, parent: ParentRequest) -> RequestOutput:
        completions = []
        for sequence in parent.sequences:
            params = sequence.request.params
            # While running, hold back text that could still turn out to start a stop string.
            holdback = max((len(s) for s in params.stop), default=1) - 1 if sequence.finish_reason is None else 0
            end = max(sequence.num_emitted_chars, len(sequence.text) - holdback)
            delta = sequence.text[sequence.num_emitted_chars : end]
            sequence.num_emitted_chars = end
            completions.append(
                CompletionOutput(
                    index=sequence.index,
                    text=sequence.text[:end],
                    token_ids=list(sequence.request.output_token_ids),
                    logprobs=sequence.logprobs,
                    finish_reason=sequence.finish_reason,
                    stop_reason=sequence.request.stop_reason,
                    text_delta=delta,
                )
            )
        first = parent.sequences[0].request
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=parent.finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics={
                "arrival_time": parent.arrival_time,
                "scheduled_time": first.scheduled_time,
                "first_token_time": parent.first_token_time,
            },
        )


def _may_speculate(sequence: _Sequence) -> bool:
    """Verification samples every proposed position from the plain distribution: requests whose sampling
    depends on the tokens before it in other ways (penalties, min_tokens, grammars) or that want logprobs
    decode one token at a time."""
    params = sequence.request.params
    return not (
        params.has_penalties or params.logprobs is not None or sequence.grammar is not None
        or sequence.request.num_output_tokens < params.min_tokens
    )


@dataclass
class SpecDecodeStats:
    """Counters of speculative decoding, for /metrics: proposals, accepted ones, acceptance by position."""

    num_speculative_tokens: int
    num_drafts: int = 0  # verification steps of one request
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.num_speculative_tokens

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1


def _find_stop(text: str, stops: list[str], previous_len: int) -> tuple[int, str] | None:
    """Earliest stop string that ends in the newly added text."""
    best = None
    for stop in stops:
        position = text.find(stop, max(0, previous_len - len(stop) + 1))
        if position != -1 and (best is None or position < best[0]):
            best = (position, stop)
    return best

