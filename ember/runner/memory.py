"""Memory: how many KV blocks fit (a CPU budget, or a GPU's measured free memory), pool tensors whose pages
cost nothing until written, and the C heap after loading."""
from __future__ import annotations

import ctypes
import math
import mmap
from collections.abc import Callable

import torch

from ember.config import CacheConfig

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def num_kv_blocks(cache_config: CacheConfig, bytes_per_token: int) -> int:
    """Blocks that fit in `kv_cache_memory_gib`, unless `num_kv_blocks` fixes the number."""
    if cache_config.num_kv_blocks is not None:
        return cache_config.num_kv_blocks
    budget = int(cache_config.kv_cache_memory_gib * (1 << 30))
    return max(1, budget // (cache_config.block_size * bytes_per_token))


def profile_num_kv_blocks(warm_up: Callable[[], None], cache_config: CacheConfig, bytes_per_block: int,
                          device: torch.device) -> int:
    """GPU: the blocks that fit in `gpu_memory_utilization` of the device once the weights and the activation
    peak of `warm_up` (the largest step) are counted, and what other processes and the CUDA context hold."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    warm_up()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)  # weights + the step's activations
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    not_ours = total - free - torch.cuda.memory_reserved(device)  # the CUDA context, other processes
    budget = int(total * cache_config.gpu_memory_utilization) - peak - not_ours
    if budget < bytes_per_block:
        gib = 1 << 30
        raise ValueError(f"no GPU memory left for the KV cache: the weights and the largest step take {peak / gib:.1f} GiB "
                         f"and other users {not_ours / gib:.1f} GiB of {total / gib:.1f} GiB; raise gpu_memory_utilization "
                         f"({cache_config.gpu_memory_utilization}) or lower max_num_batched_tokens / max_num_seqs")
    return budget // bytes_per_block


def allocate_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return lazy_zeros(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros whose memory is an anonymous mapping: the kernel hands out zeroed pages on
    first write, so resident memory grows with the blocks used, not with the budget (torch.zeros writes
    every page up front: ~1 s and 1 GiB resident for the default budget).

    Zeros, not torch.empty's garbage: batched decode attention reads the padding slots of partly filled
    blocks behind a mask, and a NaN there would survive its zero weight (NaN * 0 = NaN).
    """
    num_bytes = math.prod(shape) * dtype.itemsize
    # torch.frombuffer keeps a reference to the mapping, so it lives as long as the tensor.
    return torch.frombuffer(mmap.mmap(-1, max(num_bytes, 1)), dtype=dtype, count=math.prod(shape)).view(shape)


def settle_heap() -> None:
    """Once loading is over and its tensors are freed: hand back what loading freed, then keep later freed
    temporaries for reuse (freed memory stays with the process from here on).

    glibc maps each large allocation fresh and unmaps it on free (and trims its heap top past 128 KB), so
    every prefill-sized activation paid its page faults again: RMSNorm over 512 rows took 1.5 ms instead
    of 0.3. Raising the mmap and trim thresholds keeps those pages; resident memory grows by the peak of
    one step's temporaries (a few tens of MB), not more.
    """
    release_freed_memory()
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def release_freed_memory() -> None:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Loading frees as much as it keeps (the checkpoint's dequantized tensors once copied into the model,
    the quantizers' temporaries), but glibc serves allocations of a few MB from its heap after the first
    large free and keeps those pages when they are freed: ~400 MB stayed resident for SmolLM2-135M.
    """
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc(name: str):
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None
