"""ModelRunner: owns the model and its KV tensors; turns a SchedulerOutput into sampled tokens.

How each layer computes is chosen once, here, as the model's backends (ember/backends): on a CPU, Ember's C
kernels for this CPU's instruction set (or the reference torch ops) with int4 / int8 weight copies; on a GPU
(`use_triton`), Triton kernels, metadata as device tensors and CUDA graphs for decode steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ember.backends import Backends, select_backends
from ember.backends.attention_metadata import to_device
from ember.config import EngineConfig
from ember.models.registry import get_model_class
from ember.ops.cpu_kernels import KernelLibrary, select_kernels
from ember.runner.cuda_graphs import DecodeGraphs
from ember.runner.device import resolve_device, resolve_dtype, resolve_kv_cache_dtype
from ember.runner.memory import allocate_kv_cache, num_kv_blocks, profile_num_kv_blocks
from ember.runner.rejection_sampler import verify_proposals
from ember.runner.sampler import SampledToken, Sampler

if TYPE_CHECKING:  # read by duck typing; the engine imports the runner, not the other way round
    from ember.engine.scheduler_output import SchedulerOutput


@dataclass
class _LookaheadRow:
    row: int  # in the lookahead's hidden states
    position: int
    block_id: int  # the block the position's K/V went to
    token_id: int = -1  # the token the row was fed: the previous step's sample, known once it reaches the host


@dataclass
class _Lookahead:
    """The next decode step's forward, launched before this step's tokens reach the host (see `execute`)."""
    hidden: torch.Tensor  # [num_rows, hidden_size]
    rows: dict[str, _LookaheadRow]


def build_model(model_class: type, hf_config: dict, tensors: dict, dtype: torch.dtype, backends: Backends,
                device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model on `device` with its checkpoint loaded (strictly) and every module's weights prepared by its backend."""
    with torch.device(device):  # parameters and buffers are born on the device
        model = model_class(hf_config, dtype, backends)
    model.load_weights(tensors)
    model.eval()
    for module in reversed(list(model.modules())):  # each module after everything inside it
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict, tensors: dict[str, torch.Tensor], eos_token_ids: set[int],
                 quantize: str | None = None, use_triton: bool | None = None, profile_kv_memory: bool = True,
                 lookahead: bool | None = None):
        """`quantize`: "int4" | "int8" | None (see ember.runner.device.resolve_quantization). `use_triton`: the GPU
        path's kernels; None: on a GPU. The tests run that path on the CPU under Triton's interpreter.
        `profile_kv_memory`: on a GPU, size the KV cache from the free memory (else from kv_cache_memory_gib).
        `lookahead`: launch each step's likely successor before the host has its tokens (see `execute`); None:
        with CUDA graphs and without speculative decoding (whose steps are never plain decodes)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.use_triton = self.device.type == "cuda" if use_triton is None else use_triton
        self.block_size = config.cache.block_size
        context_len = hf_config.get("max_position_embeddings") or 2048
        self.max_model_len = min(config.model.max_model_len or context_len, context_len)
        model_class = get_model_class(hf_config.get("architectures") or [])
        self.backends = select_backends(
            device=self.device, dtype=self.dtype, quantize=quantize, batch_invariant=config.batch_invariant,
            use_triton=self.use_triton, kernels=self._kernels(config.model.cpu_kernels),
            int8_activations=config.model.int8_activations)
        self.model = build_model(model_class, hf_config, tensors, self.dtype, self.backends, self.device)
        # A half cache where the weights are quantized copies on the C kernels (their outputs are approximate already)
        quantized_c_kernels = bool(quantize) and self.backends.kernels is not None and not config.batch_invariant
        self.kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype, quantized_c_kernels,
                                               self.use_triton)
        bytes_per_block = (2 * self.model.num_layers * self.model.num_kv_heads * self.model.head_dim
                           * self.kv_dtype.itemsize * self.block_size)
        if self.device.type == "cuda" and config.cache.num_kv_blocks is None and profile_kv_memory:
            self.num_blocks = profile_num_kv_blocks(lambda: self._run_largest_step(config), config.cache,
                                                    bytes_per_block, self.device)
        else:
            self.num_blocks = num_kv_blocks(config.cache, bytes_per_block // self.block_size)
        # The GPU path keeps one more block, never handed out: CUDA-graph padding rows write their K/V there.
        shape = self.model.kv_cache_shape(self.num_blocks + self.use_triton, self.block_size)
        self.kv_caches = [allocate_kv_cache(shape, self.kv_dtype, self.device) for _ in range(self.model.num_layers)]
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, config.scheduler.max_num_seqs,
                                       -(-self.max_model_len // self.block_size), self.num_blocks * self.block_size)
        self.sampler = Sampler(eos_token_ids)
        if lookahead is None:
            lookahead = self.graphs is not None and config.speculation.speculative == "none"
        self.use_lookahead = lookahead
        self.lookahead: _Lookahead | None = None
        self.num_lookahead_rows_used = 0  # decode rows whose forward was the lookahead's (tests, metrics)
        self.seed = config.model.seed
        self.generators: dict[str, torch.Generator] = {}  # per seeded request, alive until it finishes

    def _kernels(self, requested: str) -> KernelLibrary | None:
        """The CPU kernel library (config cpu_kernels), where the model runs float32 on a CPU."""
        if self.use_triton or self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        return select_kernels(requested)

    @property
    def num_kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @torch.inference_mode()
    def execute(
        self, scheduler_output: "SchedulerOutput", token_bitmasks: dict[str, torch.Tensor] | None = None
    ) -> dict[str, list[SampledToken]]:
        """Runs one step; returns the new tokens of each request whose step ended its known tokens: one, or
        with proposed tokens to verify, the accepted proposals and one more.

        `token_bitmasks`: request id → int32 [ceil(vocab / 32)] allowed-token bits, for constrained requests.
        """
        for request_id in scheduler_output.finished_request_ids:
            self.generators.pop(request_id, None)
        requests = scheduler_output.requests
        lookahead, self.lookahead = self.lookahead, None
        if lookahead is not None:  # a finished request's id may come back with another request
            for request_id in scheduler_output.finished_request_ids:
                lookahead.rows.pop(request_id, None)
        if not requests:
            return {}
        hidden, query_start_loc = self._hidden_states(requests, lookahead)  # [num_tokens, hidden_size]
        # Logits of each sampled request's last row, and of the rows after each proposed token.
        plain, speculative, plain_rows, spec_rows = [], [], [], []
        for i, r in enumerate(requests):
            end = query_start_loc[i + 1]
            if r.do_sample and r.num_spec_tokens == 0:
                plain.append(r)
                plain_rows.append(end - 1)
            elif r.do_sample:
                speculative.append(r)
                spec_rows += range(end - 1 - r.num_spec_tokens, end)
        if not plain_rows and not spec_rows:
            return {}
        rows = to_device(plain_rows + spec_rows, torch.long, self.device)
        logits = self.model.compute_logits(hidden[rows])  # [num_rows, vocab_size]
        results = {}
        if plain:
            bitmasks = [(token_bitmasks or {}).get(r.request_id) for r in plain]
            # Whilst the host waits for this step's tokens and then schedules the next step, the device can
            # already run that step's forward: each request's decode of the token just sampled, fed on the
            # device. The next `execute` uses the rows its requests match and computes the others.
            # (Those whose next position has no block yet are left out: the scheduler gives each request the
            # next token's block ahead when it can, see KVCacheManager.num_lookahead_slots.)
            ahead = [i for i, r in enumerate(plain) if self._has_next_slot(r)] if self.use_lookahead and not speculative else []
            on_sampled = None
            if ahead:
                on_sampled = lambda token_ids: self._launch_lookahead(  # noqa: E731
                    [plain[i] for i in ahead],
                    token_ids if len(ahead) == len(plain) else token_ids[to_device(ahead, torch.long, self.device)])
            tokens = self.sampler(logits[: len(plain)], plain, [self._generator(r) for r in plain], bitmasks,
                                  on_sampled=on_sampled)
            results = {r.request_id: [token] for r, token in zip(plain, tokens)}
            if self.lookahead is not None:
                for r, token in zip(plain, tokens):
                    if r.request_id in self.lookahead.rows:
                        self.lookahead.rows[r.request_id].token_id = token.token_id
        if speculative:
            token_ids = verify_proposals(logits[len(plain):], speculative, [self._generator(r) for r in speculative])
            results |= {r.request_id: [SampledToken(t) for t in ids] for r, ids in zip(speculative, token_ids)}
        return results

    def _hidden_states(self, requests: list, lookahead: _Lookahead | None) -> tuple[torch.Tensor, list[int]]:
        """The step's hidden states ([num_tokens, hidden_size]) and its query_start_loc: the lookahead's rows for
        the decodes it ran as this step has them (same position, token and block), a forward for the rest."""
        reused = {}  # index in requests -> lookahead row
        for i, r in enumerate(requests):
            row = lookahead.rows.get(r.request_id) if lookahead is not None else None
            if (row is not None and r.num_tokens == 1 and not r.num_spec_tokens and r.start_position == row.position
                    and r.token_ids[0] == row.token_id and r.block_ids[row.position // self.block_size] == row.block_id):
                reused[i] = row.row
        self.num_lookahead_rows_used += len(reused)
        fresh = [r for i, r in enumerate(requests) if i not in reused]
        query_start_loc = [0]
        for r in requests:
            query_start_loc.append(query_start_loc[-1] + r.num_tokens)
        if not fresh:
            rows = list(reused.values())
            if rows == list(range(len(lookahead.hidden))):
                return lookahead.hidden, query_start_loc
            return lookahead.hidden[to_device(rows, torch.long, self.device)], query_start_loc
        # Gather the reused rows first: the fresh forward may replay the CUDA graph whose output holds them.
        kept = lookahead.hidden[to_device(list(reused.values()), torch.long, self.device)] if reused else None
        input_ids, positions, slots, fresh_start_loc = [], [], [], [0]
        for r in fresh:
            input_ids += r.token_ids
            token_positions = range(r.start_position, r.start_position + r.num_tokens)
            positions += token_positions
            slots += [self._slot(r.block_ids, p) for p in token_positions]
            fresh_start_loc.append(fresh_start_loc[-1] + r.num_tokens)
        seq_lens = [r.start_position + r.num_tokens for r in fresh]
        hidden = self._forward(input_ids, positions, slots, fresh_start_loc, seq_lens, [r.block_ids for r in fresh])
        if kept is None:
            return hidden, query_start_loc
        # Rows of cat([kept, hidden]) in the step's order.
        order, next_kept, next_fresh = [], 0, len(reused)
        for i, r in enumerate(requests):
            if i in reused:
                order.append(next_kept)
                next_kept += 1
            else:
                order += range(next_fresh, next_fresh + r.num_tokens)
                next_fresh += r.num_tokens
        return torch.cat([kept, hidden])[to_device(order, torch.long, self.device)], query_start_loc

    def _slot(self, block_ids: list[int], position: int) -> int:
        """The flat KV-cache slot of a sequence's position."""
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _has_next_slot(self, request) -> bool:
        """Whether the request's next decode has its K/V slot already: its position is within the blocks held."""
        position = request.start_position + request.num_tokens
        return position < self.max_model_len and position // self.block_size < len(request.block_ids)

    def _launch_lookahead(self, requests: list, token_ids: torch.Tensor) -> None:
        """Queues the decode of `token_ids` (on the device, one per request) at each request's next position."""
        positions = [r.start_position + r.num_tokens for r in requests]
        slots = [self._slot(r.block_ids, p) for r, p in zip(requests, positions)]
        block_ids = [slot // self.block_size for slot in slots]
        hidden = self._forward(token_ids, positions, slots, list(range(len(requests) + 1)), [p + 1 for p in positions],
                               [r.block_ids for r in requests])
        self.lookahead = _Lookahead(hidden, {r.request_id: _LookaheadRow(i, p, b)
                                             for i, (r, p, b) in enumerate(zip(requests, positions, block_ids))})

    def _forward(self, input_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], query_start_loc: list[int],
                 seq_lens: list[int], block_tables: list[list[int]],
                 kv_caches: list[torch.Tensor] | None = None) -> torch.Tensor:  # [num_tokens, hidden_size]
        is_decode = len(input_ids) == len(seq_lens)  # one new token per sequence
        if kv_caches is None and self.graphs is not None and is_decode and len(seq_lens) <= self.graphs.max_num_seqs:
            return self.graphs.run(input_ids, positions, slots, seq_lens, block_tables)
        metadata = self.backends.attention.build_metadata(slots, query_start_loc, seq_lens, block_tables, self.device)
        if not isinstance(input_ids, torch.Tensor):
            input_ids = to_device(input_ids, torch.long, self.device)
        return self.model(input_ids, to_device(positions, torch.long, self.device),
                          self.kv_caches if kv_caches is None else kv_caches, metadata)

    @torch.inference_mode()
    def _run_largest_step(self, config: EngineConfig) -> None:
        """The largest step the scheduler may send (a prefill of its whole token budget, logits and sampling for
        every running sequence) on a throwaway KV cache: the activation peak to leave room for."""
        num_tokens = min(config.scheduler.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size)
        kv_caches = [torch.zeros(self.model.kv_cache_shape(num_blocks, self.block_size), dtype=self.kv_dtype,
                                 device=self.device) for _ in range(self.model.num_layers)]
        tokens = list(range(num_tokens))
        hidden = self._forward([0] * num_tokens, tokens, tokens, [0, num_tokens], [num_tokens],
                               [list(range(num_blocks))], kv_caches)
        logits = self.model.compute_logits(hidden[-1:].expand(config.scheduler.max_num_seqs, -1))
        logits.log_softmax(dim=-1).sort(dim=-1, descending=True)  # what top-p and logprobs allocate

    def _generator(self, request) -> torch.Generator | None:
        if request.params.seed is None:
            return None
        generator = self.generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self.generators[request.request_id] = generator
        return generator
