"""How many KV blocks fit in the configured memory budget."""
from __future__ import annotations

from ember.config import CacheConfig


def num_kv_blocks(cache_config: CacheConfig, bytes_per_token: int) -> int:
    """Blocks that fit in `kv_cache_memory_gib`, unless `num_kv_blocks` fixes the number."""
    if cache_config.num_kv_blocks is not None:
        return cache_config.num_kv_blocks
    budget = int(cache_config.kv_cache_memory_gib * (1 << 30))
    return max(1, budget // (cache_config.block_size * bytes_per_token))
