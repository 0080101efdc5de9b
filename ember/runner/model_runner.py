"""ModelRunner: owns the model and its KV tensors; turns a SchedulerOutput into sampled tokens."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ember.config import EngineConfig
from ember.layers.attention import AttentionMetadata
from ember.models.registry import get_model_class
from ember.runner.memory import lazy_zeros, num_kv_blocks
from ember.runner.rejection_sampler import verify_proposals
from ember.runner.sampler import SampledToken, Sampler

if TYPE_CHECKING:  # read by duck typing; the engine imports the runner, not the other way round
    from ember.engine.scheduler_output import SchedulerOutput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict, tensors: dict[str, torch.Tensor], eos_token_ids: set[int],
                 quantize: bool = False):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = DTYPES[config.model.dtype]
        self.block_size = config.cache.block_size
        model_class = get_model_class(hf_config.get("architectures") or [])
        self.model = model_class(hf_config, dtype=self.dtype, batch_invariant=config.batch_invariant)
        self.model.load_weights(tensors)
        self.model.eval()
        if quantize:  # weight-only copies for decode-sized batches: int4 layers, an int8 head
            for module in self.model.modules():
                if hasattr(module, "quantize"):
                    module.quantize()
        bytes_per_token = 2 * self.model.num_layers * self.model.num_kv_heads * self.model.head_dim * self.dtype.itemsize
        self.num_blocks = num_kv_blocks(config.cache, bytes_per_token)
        shape = self.model.kv_cache_shape(self.num_blocks, self.block_size)
        self.kv_caches = [lazy_zeros(shape, self.dtype) for _ in range(self.model.num_layers)]
        self.sampler = Sampler(eos_token_ids)
        self.seed = config.model.seed
        self.generators: dict[str, torch.Generator] = {}  # per seeded request, alive until it finishes

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
        if not requests:
            return {}
        input_ids, positions, slots, query_start_loc = [], [], [], [0]
        for r in requests:
            input_ids += r.token_ids
            token_positions = range(r.start_position, r.start_position + r.num_tokens)
            positions += token_positions
            slots += [r.block_ids[p // self.block_size] * self.block_size + p % self.block_size for p in token_positions]
            query_start_loc.append(query_start_loc[-1] + r.num_tokens)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_start_loc=query_start_loc,
            seq_lens=[r.start_position + r.num_tokens for r in requests],
            block_tables=[r.block_ids for r in requests],
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), self.kv_caches, metadata
        )  # [num_tokens, hidden_size]
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
        logits = self.model.compute_logits(hidden[torch.tensor(plain_rows + spec_rows)])  # [num_rows, vocab_size]
        results = {}
        if plain:
            bitmasks = [(token_bitmasks or {}).get(r.request_id) for r in plain]
            tokens = self.sampler(logits[: len(plain)], plain, [self._generator(r) for r in plain], bitmasks)
            results = {r.request_id: [token] for r, token in zip(plain, tokens)}
        if speculative:
            token_ids = verify_proposals(logits[len(plain):], speculative, [self._generator(r) for r in speculative])
            results |= {r.request_id: [SampledToken(t) for t in ids] for r, ids in zip(speculative, token_ids)}
        return results

    def _generator(self, request) -> torch.Generator | None:
        if request.params.seed is None:
            return None
        generator = self.generators.get(request.request_id)
        if generator is None:
            generator = self.generators[request.request_id] = torch.Generator().manual_seed(request.params.seed)
        return generator
